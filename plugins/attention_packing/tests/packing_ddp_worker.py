"""One rank of the 2-process DDP check (run by torch.multiprocessing.spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

LENGTHS = [11, 4, 9, 7, 13, 3, 8, 6, 5, 10, 2, 12]
BUDGET = 48


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from packing_tiny_models import random_examples, tiny_model
        from torch.nn.parallel import DistributedDataParallel

        from accel_attention_packing.attention import disable_kv_cache, register_varlen_attention
        from accel_attention_packing.collator import PaddingFreeCollator
        from accel_attention_packing.multipack import MultipackBatchSampler

        name = register_varlen_attention()
        examples = random_examples(LENGTHS, seed=11)
        sampler = MultipackBatchSampler(
            LENGTHS, num_replicas=world, rank=rank, max_tokens_per_rank=BUDGET, seed=0
        )
        indices = next(iter(sampler))
        batch = PaddingFreeCollator()([{"input_ids": examples[i]} for i in indices])
        model = tiny_model("llama", attn=name).train()
        disable_kv_cache(model)
        ddp = DistributedDataParallel(model)
        n_items = (batch["labels"][:, 1:] != -100).sum()
        dist.all_reduce(n_items)
        # DDP averages gradients over ranks; scale so the result is the global token mean.
        loss = ddp(**batch, num_items_in_batch=n_items).loss * world
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save({"indices": indices, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

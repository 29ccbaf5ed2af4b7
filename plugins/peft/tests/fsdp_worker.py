"""One rank of the FSDP2 tests: a 4-bit model with LoRA (bitsandbytes, or a GPTQ checkpoint
through gptqmodel), every decoder layer and the root wrapped with ``fully_shard``, three SGD
steps on this rank's half of a fixed batch. The packed weights shard like any parameter:
bitsandbytes' because their storage dtype is the training dtype, GPTQ's because the plugin
registers them as frozen parameters. Rank 0 saves the losses, the gathered LoRA weights and
the placements of the packed weights.

Usage: torchrun --nproc_per_node 2 fsdp_worker.py bnb|gptq <model_dir> <output file>
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

#: the packed tensors of one quantized linear, per kind of base
PACKED = {"bnb": ("weight",), "gptq": ("qweight", "qzeros", "scales", "g_idx")}


def build(kind: str, model_dir: str):
    import peft
    from transformers import TrainingArguments

    from accel_peft.adapters import add_adapters
    from accel_peft.loading import load_bnb_4bit, load_gptq

    if kind == "bnb":
        model = load_bnb_4bit(model_dir, {"dtype": torch.float32}, "nf4")
    else:
        model = load_gptq(model_dir, {"dtype": torch.float32})  # fp16 scales, fp32 compute
    args = TrainingArguments("/tmp/accel-peft-fsdp-unused", report_to=[])
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return add_adapters(model, args, config)


def full_batch() -> torch.Tensor:
    return torch.randint(4, 60, (4, 12), generator=torch.Generator().manual_seed(5))


def train(model, x: torch.Tensor, steps: int = 3) -> list[float]:
    """Plain SGD: the update is linear in the gradient, so rounding-level differences of the
    reduce-scatter stay rounding-level (Adam's first step turns near-zero gradient entries of
    either sign into full-size updates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=2.0)
    model.train()  # in eval mode bitsandbytes repacks CPU weights into its inference layout,
    # and gptqmodel caches a dequantized weight
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def main() -> None:
    kind, model_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build(kind, model_dir)
    base = model.get_base_model()
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    linear = base.model.layers[0].self_attn.q_proj.base_layer
    packed = {name: getattr(linear, name) for name in PACKED[kind]}
    for name, tensor in packed.items():
        assert isinstance(tensor, DTensor), (name, type(tensor))
    local = {name: tuple(t.to_local().shape) for name, t in packed.items()}
    full = {name: tuple(t.shape) for name, t in packed.items()}
    rows = full_batch().shape[0] // world
    x = full_batch()[rank * rows : (rank + 1) * rows]
    losses = train(model, x)
    mean = []
    for loss in losses:
        dist.all_reduce(loss)
        mean.append(loss.item() / world)
    lora = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, lora)  # every rank's copy, to prove them identical
    if rank == 0:
        placements = {name: str(t.placements) for name, t in packed.items()}
        result = {"losses": mean, "lora": gathered, "placements": placements}
        torch.save({**result, "local_shapes": local, "full_shapes": full}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

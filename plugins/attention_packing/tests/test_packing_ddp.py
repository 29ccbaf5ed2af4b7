"""Two gloo processes: multipack shards + padding-free batches + varlen attention under DDP
give the gradient of one padded batch holding the union of both ranks' examples.
Tolerance: rtol 1e-4, atol 1e-6 (fp32)."""

import torch
import torch.multiprocessing as mp
from packing_ddp_worker import LENGTHS, run_rank
from packing_tiny_models import padded_batch, random_examples, tiny_model

PORT = 29631  # fixed, so concurrent multi-process tests never pick the same one


def test_ddp_two_ranks_match_single_padded_batch(tmp_path):
    mp.spawn(run_rank, args=(2, PORT, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    idx0, idx1 = results[0]["indices"], results[1]["indices"]
    assert idx0 and idx1 and not set(idx0) & set(idx1)
    for name, g in results[0]["grads"].items():  # DDP: identical after all-reduce
        torch.testing.assert_close(g, results[1]["grads"][name], rtol=0, atol=0)
    assert results[0]["grads"].keys() == results[1]["grads"].keys()

    examples = random_examples(LENGTHS, seed=11)
    model = tiny_model("llama").train()
    model.config.use_cache = False
    model(**padded_batch([examples[i] for i in idx0 + idx1])).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(results[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-6)

"""Train with padding-free + multipack through accel.train and record, per rank, the identity of
every example each collator call received (``RECORD_DIR/rank{R}.jsonl``) and, after training,
the rank's parameters and log history (``RECORD_DIR/rank{R}.pt``).

Under torchrun it is one rank of a DDP run. With ``UNION_OF_RANKS=N`` in a single process it is
that run's reference: the multipack sampler is replaced by one that yields, at every step, the
union of the N ranks' bins of the N-rank plan (same lengths, seed and epochs, each rank's bins
sized for batch_size / N), so one process trains on exactly the global batches of the N ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from trainer_fixtures import identity

import accel
from accel.trainer.trainer import AccelTrainer
from accel_attention_packing import collator as collator_module
from accel_attention_packing import multipack

RECORD_DIR = Path(os.environ["RECORD_DIR"])
RANK = os.environ.get("RANK", "0")
_original_call = collator_module.PaddingFreeCollator.__call__
_original_train = AccelTrainer.train
_Multipack = multipack.MultipackBatchSampler


def recording_call(self, features):
    with (RECORD_DIR / f"rank{RANK}.jsonl").open("a") as fh:
        fh.write(json.dumps([identity(list(f["input_ids"])) for f in features]) + "\n")
    return _original_call(self, features)


def recording_train(self, *args, **kwargs):
    output = _original_train(self, *args, **kwargs)
    params = {
        n.removeprefix("module."): p.detach().clone() for n, p in self.model.named_parameters()
    }
    state = {"params": params, "log_history": self.state.log_history}
    torch.save(state, RECORD_DIR / f"rank{RANK}.pt")
    return output


class UnionOfRanks:
    """At each step, the concatenated bins of every rank of an N-rank multipack plan."""

    def __init__(self, lengths, *, num_replicas, rank, batch_size=None, **kwargs):
        n = int(os.environ["UNION_OF_RANKS"])
        assert num_replicas == 1 and rank == 0, "the reference runs in one process"
        per_rank = batch_size // n if batch_size else None
        self.ranks = [
            _Multipack(lengths, num_replicas=n, rank=r, batch_size=per_rank, **kwargs)
            for r in range(n)
        ]

    def __iter__(self):
        for bins in zip(*self.ranks, strict=True):
            yield [i for b in bins for i in b]

    def __len__(self) -> int:
        return len(self.ranks[0])

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.ranks:
            sampler.set_epoch(epoch)


collator_module.PaddingFreeCollator.__call__ = recording_call
AccelTrainer.train = recording_train
if os.environ.get("UNION_OF_RANKS"):
    multipack.MultipackBatchSampler = UnionOfRanks

if __name__ == "__main__":
    accel.train(json.loads(Path(sys.argv[1]).read_text()))

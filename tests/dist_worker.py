"""Run one rank of ``accel.train`` under torchrun / accelerate launch and record, per rank, what
the model really holds after training.

Usage: ``dist_worker.py ARGS.json OUT_DIR [--force-fsdp]``. Writes ``OUT_DIR/rank{R}.pt``:
``params`` (each parameter as a full tensor, gathered from its shards when it is a DTensor),
``param_types`` (class name of each parameter as the rank holds it), ``local_numel`` (elements
of each parameter the rank stores), ``distributed_type``, ``tokens`` (the trainer's global token counts: all
positions, non-padding positions) and the trainer's ``log_history``.

``--force-fsdp`` switches accelerate's distributed type from MULTI_CPU to FSDP right after
accelerate builds its state, with the FSDP plugin accelerate made from the launcher's
environment (``ACCELERATE_USE_FSDP`` / ``FSDP_*``). That is the one thing it forces: accelerate
only enables FSDP for GPU-like distributed types (accelerate/state.py), and everything after
(wrapping with ``fully_shard``, sharded state dicts, save, resume) is accelerate's and
transformers' own code running on CPU/gloo.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import accel
from accel.trainer.trainer import AccelTrainer


def force_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = AcceleratorState.__init__
    forced = (DistributedType.MULTI_CPU, DistributedType.FSDP)

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # the plugin the Trainer's Accelerator passes (from --fsdp/fsdp_config or, with
        # accelerate launch, from the config's FSDP_* variables); an AcceleratorState made
        # earlier without one takes accelerate's plugin from those variables
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None and os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
            plugin = getattr(self, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        if plugin is not None and self.distributed_type in forced:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


def record(trainer: AccelTrainer, out_dir: Path) -> None:
    from torch.distributed.tensor import DTensor

    model = trainer.model_wrapped
    params, types, local = {}, {}, {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        types[name] = type(p).__name__
        full = p.full_tensor() if isinstance(p, DTensor) else p
        local[name] = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        params[name] = full.detach().cpu().clone()
    tokens = trainer.global_token_counts()  # a collective: every rank calls it
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "params": params,
            "param_types": types,
            "local_numel": local,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "tokens": tokens,
            "log_history": trainer.state.log_history,
        },
        out_dir / f"rank{rank}.pt",
    )


def recording_train(out_dir: Path):
    """``AccelTrainer.train`` that records the rank's state once training returns."""
    original_train = AccelTrainer.train

    def train(self, *a, **k):
        output = original_train(self, *a, **k)
        record(self, out_dir)
        return output

    return train


def main() -> None:
    args_file, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if "--force-fsdp" in sys.argv[3:]:
        force_fsdp_on_cpu()
    AccelTrainer.train = recording_train(out_dir)
    accel.train(json.loads(args_file.read_text()))


if __name__ == "__main__":
    main()

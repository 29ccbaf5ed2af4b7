"""Ranks of stop-and-resume scenarios, each three ``accel.train`` runs in the same processes
(one launch for every scenario, so the multi-process resume tests pay torchrun's start-up once).

Usage: ``dist_resume_worker.py SCENARIOS.json OUT_DIR STOP_AT``; SCENARIOS.json maps a name to
the arguments of a run. Per scenario, in ``OUT = OUT_DIR/<name>``:

1. ``full``: uninterrupted, into ``OUT/full-out`` (its checkpoints) and ``OUT/full-model``
   (the final model);
2. ``stopped``: into ``OUT/resumed-out``, stopped after step STOP_AT, whose checkpoint it has
   just written (a run that ends there, as a killed one would after its save);
3. ``resumed``: the same output_dir again, auto-resuming from that checkpoint to the end, final
   model into ``OUT/resumed-model``.

Runs 1 and 3 are recorded as ``OUT/{full,resumed}/rank{R}.pt`` (see dist_worker.record).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from dist_worker import record
from transformers import TrainerCallback

import accel
from accel.trainer.trainer import AccelTrainer


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run(args: dict, out: Path, name: str, stop_at: int | None) -> None:
    original = AccelTrainer.train

    def train(self, *a, **k):
        if stop_at:
            self.add_callback(StopAt(stop_at))
        output = original(self, *a, **k)
        if not stop_at:
            (out / name).mkdir(exist_ok=True)
            record(self, out / name)
        return output

    AccelTrainer.train = train
    try:
        accel.train(args)
    finally:
        AccelTrainer.train = original
    dist.barrier()  # every rank's files of this run are written before the next one reads them


def main() -> None:
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    root, stop_at = Path(sys.argv[2]), int(sys.argv[3])
    for name, args in scenarios.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        full = {
            **args,
            "output_dir": str(out / "full-out"),
            "save_model_dir": str(out / "full-model"),
        }
        run(full, out, "full", None)
        resumed = {**args, "output_dir": str(out / "resumed-out")}
        resumed.pop("save_model_dir", None)
        run(resumed, out, "stopped", stop_at)
        run({**resumed, "save_model_dir": str(out / "resumed-model")}, out, "resumed", None)


if __name__ == "__main__":
    main()

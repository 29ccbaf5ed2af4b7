"""Callbacks of the thin trainer: JSONL logs, token throughput, plugin save hooks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per log event to ``output_dir/training_logs.jsonl`` (main process).
    Each line also holds ``tokens_seen`` (this process's count times the processes), from which
    ``accel plot loss`` draws tokens/s."""

    def __init__(self, output_dir: str, trainer: Any = None) -> None:
        self.path = Path(output_dir) / "training_logs.jsonl"
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """On resume, drop the records of steps after the checkpoint (training that was redone)
        and a line cut off by a killed process, so the log follows the resumed run."""
        if not state.is_world_process_zero:
            return
        tmp = self.path.with_name(f".{self.path.name}.accel-tmp")
        tmp.unlink(missing_ok=True)  # left by a process killed while rewriting the log
        if not state.global_step or not self.path.is_file():
            return
        text = self.path.read_text()
        kept = [line for line in text.splitlines(keepends=True) if _before(line, state.global_step)]
        if "".join(kept) != text:
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, "timestamp": time.time(), **logs}
        seen = getattr(self.trainer, "tokens_seen", None)
        if isinstance(seen, int) and "loss" in logs:
            record["tokens_seen"] = seen * max(1, args.world_size)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _before(line: str, step: int) -> bool:
    if not line.endswith("\n"):
        return False  # cut off mid-write
    try:
        return int(json.loads(line).get("step", 0)) <= step
    except (ValueError, TypeError, AttributeError):
        return True  # not a record of ours: keep it


class PluginSaveCallback(TrainerCallback):
    """Run the plugins' ``on_save`` hook after every checkpoint the trainer writes."""

    def __init__(self, framework: Any, model: Any) -> None:
        self.framework = framework
        self.model = model

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            self.framework.on_save(str(checkpoint), self.model)

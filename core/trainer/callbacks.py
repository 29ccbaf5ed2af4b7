"""Callbacks of the thin trainer: JSONL logs, token throughput, plugin save hooks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per log event to ``output_dir/training_logs.jsonl`` (main process)."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "training_logs.jsonl"

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, "timestamp": time.time(), **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


class PluginSaveCallback(TrainerCallback):
    """Run the plugins' ``on_save`` hook after every checkpoint the trainer writes."""

    def __init__(self, framework: Any, model: Any) -> None:
        self.framework = framework
        self.model = model

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            self.framework.on_save(str(checkpoint), self.model)

"""What a run shows while it trains: one progress bar with the loss and tokens/s.

The libraries underneath each draw their own bars (transformers' "Loading weights" and
"Writing model shards", datasets' "Map" and "Generating train split", the Trainer's nested
evaluation bar) and the Trainer prints every log record as a dict over the bar. By default
those are off and one bar over the training steps remains, its postfix holding the last
logged loss and the training throughput; evaluation results are one line each.
``ACCEL_PROGRESS=verbose`` brings every library bar and the Trainer's own bar back;
``--disable_tqdm True`` turns the bar off.
"""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import TrainerCallback

#: environment variable: "verbose" keeps the libraries' own progress bars
SWITCH = "ACCEL_PROGRESS"


def verbose() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("verbose", "all", "1", "true")


def quiet_library_bars() -> None:
    """Turn off transformers', huggingface_hub's and datasets' progress bars (not verbose)."""
    if verbose():
        return
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


class TrainingBar(TrainerCallback):
    """One tqdm bar over the optimizer steps (main process); loss and tokens/s as postfix."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.bar: Any = None
        self.start = 0.0
        self.tokens_at_start = 0
        self.loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, desc="training", dynamic_ncols=True
        )
        self.start = time.perf_counter()
        self.tokens_at_start = getattr(self.trainer, "tokens_seen", 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        self.bar.set_postfix_str(self._postfix(args), refresh=False)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
            self.bar.set_postfix_str(self._postfix(args))
        timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
        evaluated = {k: v for k, v in logs.items() if k.startswith("eval_") and k not in timing}
        if "eval_loss" in evaluated:
            shown = ", ".join(f"{k[5:]} {_short(v)}" for k, v in evaluated.items())
            self.bar.write(f"step {state.global_step} evaluation: {shown}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(args))
            self.bar.close()
            self.bar = None

    def _postfix(self, args: Any) -> str:
        """Tokens/s from this process's count times the processes (ranks see equal batches
        except for padding; the summary has the exact total)."""
        seconds = time.perf_counter() - self.start
        tokens = (getattr(self.trainer, "tokens_seen", 0) - self.tokens_at_start) * max(
            1, args.world_size
        )
        parts = [] if self.loss is None else [f"loss {self.loss:.4g}"]
        if seconds > 0 and tokens:
            parts.append(f"{tokens / seconds:,.0f} tokens/s")
        return ", ".join(parts)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def install(trainer: Any) -> None:
    """Replace the Trainer's progress callback by :class:`TrainingBar` (unless verbose or
    the bar is disabled with ``--disable_tqdm``)."""
    if verbose() or trainer.args.disable_tqdm:
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingBar(trainer))

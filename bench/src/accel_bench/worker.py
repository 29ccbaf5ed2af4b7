"""One bench run inside its own process: ``python -m accel_bench.worker <run.json>``.

The parent (:mod:`accel_bench.executor`) writes the run's trainer arguments and bench
options; this process trains through ``accel.train`` (the project's trainer, unchanged) and
writes ``result-rank<N>.json`` next to the run file: the trainer's metrics and summary on
success, the exception's type and message on failure (then exits 1). Under torchrun every
rank reports, so an error on any rank is seen.

The bench options the trainer has no argument for are a callback added to transformers'
``DEFAULT_CALLBACKS`` in this process only (the trainer builds its callback list from it):

- ``stop_after_seconds``: ask the trainer to stop at the first step end after that time;
- ``auto_stop_method: WARMUP_60S_STABLE_120S_OR_10_STEPS``: stop after at least 60 s of
  warm-up plus the longer of 120 s or 10 optimisation steps, and measure throughput over the
  stable phase only (the reference "excludes the first 60 seconds of training when
  calculating throughput and system metrics");
- ``memory_limit_mb``: when training begins (model loaded, data prepared), cap this process's
  address space at what it uses plus this many MiB, so a run that needs more meets a genuine
  allocation failure (torch's ``DefaultCPUAllocator: can't allocate memory``): a small device
  stood in for on a CPU machine, and how the tests reproduce an out-of-memory run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

WARMUP_S = 60.0
STABLE_S = 120.0
STABLE_STEPS = 10
AUTO_STOP = "WARMUP_60S_STABLE_120S_OR_10_STEPS"


def auto_stop_due(elapsed: float, warmup_end: float | None, steps_since_warmup: int) -> bool:
    """WARMUP_60S_STABLE_120S_OR_10_STEPS: at least 60 s of warm-up, then the longer of
    120 s or 10 optimisation steps. ``warmup_end`` is when the first step ended after 60 s."""
    if warmup_end is None:
        return False
    return elapsed - warmup_end >= STABLE_S and steps_since_warmup >= STABLE_STEPS


def make_callback(options: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    stop_after = float(options.get("stop_after_seconds") or -1)
    memory_limit = options.get("memory_limit_mb")
    auto = options.get("auto_stop_method") == AUTO_STOP

    class BenchCallback(TrainerCallback):
        """Stops by time and records (time, step, tokens) at every step end."""

        def __init__(self) -> None:
            self.start = 0.0
            self.tokens = [0, 0]  # positions fed (padding included), non-padding positions
            self.marks: list[tuple[float, int, int, int]] = []
            self.warmup_end: tuple[float, int, int, int] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw.get("model")
            if model is not None:
                model.register_forward_pre_hook(self._count, with_kwargs=True)
            if memory_limit:
                _limit_memory(float(memory_limit))
            self.start = time.perf_counter()

        def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or not hasattr(ids, "numel"):
                return
            mask = kwargs.get("attention_mask")
            self.tokens[0] += ids.numel()
            self.tokens[1] += int(mask.sum()) if mask is not None else ids.numel()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            elapsed = time.perf_counter() - self.start
            mark = (elapsed, state.global_step, *self.tokens)
            self.marks.append(mark)
            if auto and self.warmup_end is None and elapsed >= WARMUP_S:
                self.warmup_end = mark
            if stop_after > 0 and elapsed >= stop_after:
                control.should_training_stop = True
            if auto and self.warmup_end is not None:
                steps = state.global_step - self.warmup_end[1]
                if auto_stop_due(elapsed, self.warmup_end[0], steps):
                    control.should_training_stop = True

        def window(self) -> dict[str, Any] | None:
            """Throughput of the stable phase (auto stop), per process."""
            if self.warmup_end is None or not self.marks:
                return None
            t0, s0, k0, r0 = self.warmup_end
            t1, s1, k1, r1 = self.marks[-1]
            if t1 <= t0:
                return None
            return {
                "seconds": t1 - t0,
                "steps": s1 - s0,
                "tokens": k1 - k0,
                "real_tokens": r1 - r0,
                "warmup_seconds": t0,
            }

    return BenchCallback()


def _limit_memory(extra_mb: float) -> None:
    import resource

    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:")) * 1024
    limit = vm + int(extra_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    run_file = Path(argv[0])
    spec = json.loads(run_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    result = run_file.with_name(f"result-rank{rank}.json")
    options = spec.get("bench", {})
    callback = None
    try:
        import transformers.trainer as hf_trainer

        import accel

        callback = make_callback(options)
        hf_trainer.DEFAULT_CALLBACKS.append(callback)
        outcome = accel.train(**spec["train"])
        record: dict[str, Any] = {
            "ok": True,
            "metrics": outcome.metrics,
            "summary": outcome.summary,
            "window": callback.window(),
            "tokens_this_rank": callback.tokens,
        }
        import torch

        if torch.cuda.is_available():
            record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            record["cuda_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        _write(result, record)
        return 0
    except BaseException as err:  # report every error, then fail
        if isinstance(err, KeyboardInterrupt):
            raise
        tb = traceback.format_exc()
        with contextlib.suppress(OSError):
            _write(
                result,
                {
                    "ok": False,
                    "error": {
                        "type": f"{type(err).__module__}.{type(err).__qualname__}",
                        "message": str(err)[:4000],
                        "traceback": tb[-6000:],
                    },
                },
            )
        print(tb, file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

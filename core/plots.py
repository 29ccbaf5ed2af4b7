"""Pictures of training runs: loss, learning rate, gradient norm and tokens/s vs step, read
from each run's ``training_logs.jsonl`` (``accel plot loss <output_dir> [...]``, or
:func:`plot_runs` from Python). Several runs share the axes, one line each.

matplotlib is optional (``pip install matplotlib``, or ``accel-core[plot]``): imported only when
a plot is drawn, with the non-interactive Agg canvas. The PNG is written atomically.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, PluginRequirementError

LOG_FILE = "training_logs.jsonl"
#: (log key, axis label) of each panel; tokens/s is computed from ``tokens_seen``
PANELS = (
    ("loss", "training loss"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "tokens/s (all processes)"),
)


def read_training_log(output_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for every panel's key found in the run's log; eval
    records and the end-of-training record are skipped, a damaged line is an error naming it."""
    folder = Path(output_dir)
    log = folder / LOG_FILE
    if not folder.is_dir():
        raise ConfigError(f"accel plot loss: the run folder {folder} does not exist")
    if not log.is_file():
        raise ConfigError(
            f"accel plot loss: {log} does not exist: give the output_dir of a training run "
            "that logged at least one step (logging_steps)"
        )
    series: dict[str, list[tuple[int, float]]] = {key: [] for key, _ in PANELS}
    last_tokens: tuple[float, float] | None = None  # (timestamp, tokens_seen)
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"{log} line {number} is not JSON: the file is damaged") from None
        if not isinstance(record, dict) or "loss" not in record:
            continue  # evaluation, end-of-training summary
        step = int(record.get("step", 0))
        for key, _ in PANELS[:3]:
            if _finite(record.get(key)):
                series[key].append((step, float(record[key])))
        stamp, tokens = record.get("timestamp"), record.get("tokens_seen")
        if _finite(stamp) and _finite(tokens):
            if last_tokens is not None and stamp > last_tokens[0] and tokens > last_tokens[1]:
                rate = (tokens - last_tokens[1]) / (stamp - last_tokens[0])
                series["tokens_per_s"].append((step, rate))
            last_tokens = (stamp, tokens)
    if not series["loss"]:
        raise ConfigError(
            f"accel plot loss: {log} holds no training-loss record: the run stopped before its "
            "first logging step (lower logging_steps)"
        )
    return series


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_runs(output_dirs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Draw the runs in ``output_dirs`` side by side into the PNG ``output`` (default: the
    first run's ``loss.png``) and return its path."""
    if not output_dirs:
        raise ConfigError("accel plot loss: give at least one run folder")
    runs = {str(d): read_training_log(d) for d in output_dirs}
    target = Path(output) if output is not None else Path(output_dirs[0]) / "loss.png"
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--output {target}: the plot is a PNG, give a name ending in .png")
    if target.is_dir():
        raise ConfigError(f"--output {target} is a folder: give a file name ending in .png")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PluginRequirementError(
            "accel plot loss needs matplotlib, which is not installed. Install it with: "
            "pip install matplotlib"
        ) from None
    fig = Figure(figsize=(11.0, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    labels = _labels(list(runs))
    for ax, (key, title) in zip(axes, PANELS):
        for series, label in zip(runs.values(), labels):
            points = series[key]
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=label)
        if not any(series[key] for series in runs.values()):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    axes[0].legend(fontsize="small")
    fig.suptitle("accel runs: " + ", ".join(labels))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    from .helpers import write_atomic

    write_atomic(target, buffer.getvalue())
    return target


def _labels(folders: list[str]) -> list[str]:
    """Each run's folder name, or its whole path where two names are the same."""
    names = [Path(f).resolve().name for f in folders]
    return [n if names.count(n) == 1 else f for n, f in zip(names, folders)]

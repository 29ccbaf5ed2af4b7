"""The mixing of one run as a picture: weights and probabilities per dataset vs step, read
from the run's ``odm.jsonl`` (``accel plot odm <output_dir>``).

Imports nothing heavy: matplotlib is an optional extra (``accel-odm[plot]``), loaded only
when a plot is rendered, with the non-interactive Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from accel.api import ConfigError, PluginRequirementError, write_atomic

LOG_FILE = "odm.jsonl"  # the name OdmPlugin writes in output_dir
WIDTH, HEIGHT, DPI = 9.0, 6.5, 100  # inches, inches, dots per inch: an image of 900 x 650


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The update lines of ``odm.jsonl``, checked: every line has the step, the dataset names
    (the same on every line) and one number per dataset in ``weights`` and ``probabilities``."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{where} is not JSON ({err}): the file is damaged") from None
        _check(record, where, records[0]["datasets"] if records else None)
        records.append(record)
    if not records:
        raise ConfigError(
            f"{path} has no updates: the run stopped before the first odm update "
            "(train for at least update_interval steps, or eval_steps for validation_loss)"
        )
    return records


def _check(record: Any, where: str, names: list[str] | None) -> None:
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is not an odm update (a JSON object with 'step', ...)")
    step, datasets = record.get("step"), record.get("datasets")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ConfigError(f"{where}: 'step' must be an integer, got {step!r}")
    if (
        not isinstance(datasets, list)
        or not datasets
        or not all(isinstance(n, str) for n in datasets)
    ):
        raise ConfigError(f"{where}: 'datasets' must be a list of dataset names, got {datasets!r}")
    if names is not None and datasets != names:
        raise ConfigError(f"{where}: datasets {datasets} differ from the first line's {names}")
    for key in ("weights", "probabilities"):
        values = record.get(key)
        if (
            not isinstance(values, list)
            or len(values) != len(datasets)
            or not all(_is_number(v) for v in values)
        ):
            raise ConfigError(
                f"{where}: '{key}' must hold one finite number per dataset "
                f"({len(datasets)}), got {values!r}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def render(records: list[dict[str, Any]], output: str | Path, title: str = "") -> Path:
    """Draw the weights (top) and probabilities (bottom) of every dataset vs step into the PNG
    ``output``, written under a temporary name beside it and then renamed (never half-written)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PluginRequirementError(
            "accel plot odm needs matplotlib, which is not installed. Install it with: "
            "pip install matplotlib (or the extra: pip install 'accel-odm[plot]')"
        ) from None
    output = Path(output)
    names = records[0]["datasets"]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, name in enumerate(names):
        top.plot(steps, [r["weights"][i] for r in records], label=name)
        bottom.plot(steps, [r["probabilities"][i] for r in records], label=name)
    top.set_ylabel("weight (normalised)")
    bottom.set_ylabel("sampling probability")
    bottom.set_xlabel("step")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
    top.legend(loc="upper left", ncols=min(len(names), 4), fontsize="small")
    fig.suptitle(title or "odm: mixing weights and probabilities per dataset")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    write_atomic(output, buffer.getvalue())
    return output


def plot_run(output_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render ``<output_dir>/odm.jsonl`` to ``output`` (default ``<output_dir>/odm.png``)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ConfigError(f"accel plot odm: the run folder {output_dir} does not exist")
    log = output_dir / LOG_FILE
    if not log.is_file():
        raise ConfigError(
            f"accel plot odm: {log} does not exist: the run in {output_dir} did not use online "
            "mixing (train with --odm and a --data_config of dataprocessor.type: odm)"
        )
    target = Path(output) if output is not None else output_dir / "odm.png"
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--output {target}: the plot is a PNG, give a name ending in .png")
    if target.is_dir():
        raise ConfigError(f"--output {target} is a folder: give a file name ending in .png")
    records = read_log(log)
    return render(records, target, title=f"odm mixing: {output_dir.resolve().name}")

"""PNG per scenario: speedup and peak memory of every completed entity vs the baseline.

matplotlib is imported only here (``pip install matplotlib`` when missing; the report and the
CSV do not need it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accel.errors import ConfigError

from .scenario import Scenario


def _ratios(scenario: Scenario, latest: Mapping[str, Mapping[str, Any]]) -> tuple[list, list, list]:
    varying = scenario.varying()
    base_id = next(e.entity_id for e in scenario.entities if e.is_baseline)
    base = (latest.get(base_id) or {}).get("properties") or {}
    memory_key = (
        "gpu_memory_peak_allocated_mb"
        if base.get("gpu_memory_peak_allocated_mb")
        else ("cpu_memory_peak_rss_mb")
    )
    labels, speed, memory = [], [], []
    for e in scenario.entities:
        record = latest.get(e.entity_id) or {}
        p = record.get("properties") or {}
        if record.get("status") != "completed" or not base:
            continue
        try:
            s = p["dataset_tokens_per_second"] / base["dataset_tokens_per_second"]
            m = p[memory_key] / base[memory_key]
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        labels.append(e.label(varying) or e.entity_id)
        speed.append(s)
        memory.append(m)
    return labels, speed, memory


def plot_scenario(
    scenario: Scenario, latest: Mapping[str, Mapping[str, Any]], target: Path
) -> Path | None:
    """Write the scenario's PNG; None when fewer than one completed entity has a baseline."""
    labels, speed, memory = _ratios(scenario, latest)
    if not labels:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "plots need matplotlib: pip install matplotlib (or pass --no-plot)"
        ) from None
    height = max(2.5, 0.45 * len(labels) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    ys = list(range(len(labels)))[::-1]
    for ax, values, title in (
        (axes[0], speed, "speedup (dataset tokens/s vs baseline)"),
        (axes[1], memory, "peak memory vs baseline"),
    ):
        ax.barh(
            ys,
            values,
            color=["#4c72b0" if v >= 1 else "#c44e52" for v in values]
            if ax is axes[0]
            else ["#c44e52" if v > 1.01 else "#55a868" for v in values],
        )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        for y, v in zip(ys, values):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.25)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(labels, fontsize=8)
    fig.suptitle(f"{scenario.name} ({scenario.experiment})", fontsize=11)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target

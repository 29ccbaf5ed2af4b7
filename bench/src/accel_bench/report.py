"""Markdown report of a matrix: machine, versions, date, command, then one table per
scenario (run set) with the speedup and memory ratios against the scenario's baseline."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from .scenario import Scenario

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "accel-core",
    "accel-fused-ops",
    "accel-attention-packing",
    "accel-moe",
    "accel-peft",
    "accel-odm",
    "gptqmodel",
    "bitsandbytes",
    "triton",
)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        memory = ""
    from .scenario import default_gpu_model

    gpu = default_gpu_model()
    device = "no GPU" if gpu == "cpu" else f"GPU {gpu}"
    return f"{cpu}, {os.cpu_count()} cores{memory}, {device}; {platform.platform()}"


def versions() -> str:
    found = [f"python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def header(command: str) -> list[str]:
    return [
        "# accel bench results",
        "",
        f"- machine: {machine()}",
        f"- versions: {versions()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        "",
    ]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _ratio(value: Any, base: Any) -> str:
    try:
        return f"{float(value) / float(base):.2f}x"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def scenario_rows(
    scenario: Scenario, latest: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    varying = scenario.varying()
    stability = scenario.experiment == "finetune_full_stability"
    base = latest.get(next(e.entity_id for e in scenario.entities if e.is_baseline), {})
    bprops = base.get("properties", {}) if base.get("status") == "completed" else {}
    gpu = any(
        (latest.get(e.entity_id, {}).get("properties") or {}).get("gpu_memory_utilization_peak")
        for e in scenario.entities
    )
    if stability:
        cols = ["f_no_error", "f_gpu_oom", "f_other_error", "is_valid"]
        head = ["entity", "status", *cols]
    else:
        head = [
            "entity",
            "status",
            "train_runtime s",
            "train_tokens/s",
            "dataset_tokens/s",
            "speedup",
            "cpu util %",
            "peak RSS MiB",
            "memory",
        ]
        if gpu:
            head += ["gpu util avg %", "gpu mem peak %", "gpu alloc peak MiB", "gpu W avg"]
        head += ["final loss"]
    rows = []
    for e in scenario.entities:
        record = latest.get(e.entity_id)
        label = e.label(varying) + (" (baseline)" if e.is_baseline else "")
        if record is None:
            rows.append([label, "not run", *["-"] * (len(head) - 2)])
            continue
        p = record.get("properties") or {}
        status = record["status"]
        if status != "completed":
            reason = str(record.get("reason", ""))[:80]
            rows.append(
                [label, f"{status}: {reason}" if reason else status, *["-"] * (len(head) - 2)]
            )
            continue
        if stability:
            rows.append([label, status, *(_fmt(p.get(c)) for c in cols)])
            continue
        row = [
            label,
            status,
            _fmt(p.get("train_runtime")),
            _fmt(p.get("train_tokens_per_second")),
            _fmt(p.get("dataset_tokens_per_second")),
            _ratio(p.get("dataset_tokens_per_second"), bprops.get("dataset_tokens_per_second")),
            _fmt(p.get("cpu_compute_utilization")),
            _fmt(p.get("cpu_memory_peak_rss_mb")),
            _ratio(p.get("cpu_memory_peak_rss_mb"), bprops.get("cpu_memory_peak_rss_mb")),
        ]
        if gpu:
            row += [
                _fmt(p.get("gpu_compute_utilization_avg")),
                _fmt(p.get("gpu_memory_utilization_peak")),
                _fmt(p.get("gpu_memory_peak_allocated_mb")),
                _fmt(p.get("gpu_power_watts_avg")),
            ]
        row.append(_fmt(p.get("final_loss")))
        rows.append(row)
    return head, rows


def render(
    scenarios: Sequence[Scenario],
    latest: Mapping[str, Mapping[str, Any]],
    command: str,
    skipped: Sequence[str] = (),
) -> str:
    lines = header(command)
    lines += [
        "speedup: dataset_tokens_per_second / the baseline's; memory: peak RSS (process tree) / "
        "the baseline's. Definitions: docs/bench.md.",
        "",
    ]
    for scenario in scenarios:
        head, rows = scenario_rows(scenario, latest)
        lines += [f"## {scenario.name} ({scenario.experiment})", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        lines.append("")
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(lines)

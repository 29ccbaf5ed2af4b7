"""``accel bench ... --compare reference.csv``: flag every property worse than a reference.

Entities are matched by ``entity_id`` (the experiment and the parameters the scenario set).
A property regressed when it is worse than the reference's by more than ``tolerance``
(relative; 0.10 by default): throughputs lower, runtime or peak memory higher; fractions of
the stability experiment by more than ``tolerance`` absolute. An entity that completed in the
reference but is now invalid or failed regressed too. The command exits 1 when anything
regressed (listing each), so it can gate CI.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HIGHER_IS_BETTER = (
    "train_samples_per_second",
    "train_steps_per_second",
    "train_tokens_per_second",
    "train_tokens_per_gpu_per_second",
    "dataset_tokens_per_second",
    "dataset_tokens_per_second_per_gpu",
    "f_no_error",
)
LOWER_IS_BETTER = (
    "train_runtime",
    "cpu_memory_peak_rss_mb",
    "gpu_memory_utilization_peak",
    "gpu_memory_peak_allocated_mb",
    "f_gpu_oom",
    "f_other_error",
)
FRACTIONS = ("f_no_error", "f_gpu_oom", "f_other_error")


@dataclass
class Regression:
    entity_id: str
    scenario: str
    what: str
    reference: Any
    current: Any
    change: float | None = None

    def __str__(self) -> str:
        if self.change is None:
            return (
                f"{self.scenario} {self.entity_id}: {self.what}: {self.reference} -> {self.current}"
            )
        return (
            f"{self.scenario} {self.entity_id}: {self.what} {self.reference} -> {self.current} "
            f"({self.change:+.1%})"
        )


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def compare(
    current: Iterable[Mapping[str, Any]],
    reference: Iterable[Mapping[str, Any]],
    tolerance: float = 0.10,
) -> tuple[list[Regression], list[str]]:
    """Regressions of ``current`` rows against ``reference`` rows (both results.csv rows or
    flattened records), and notes (entities of the reference not measured now)."""
    now = {str(r["entity_id"]): r for r in current}
    regressions: list[Regression] = []
    notes: list[str] = []
    for ref in reference:
        eid = str(ref["entity_id"])
        scenario = str(ref.get("scenario", ""))
        cur = now.get(eid)
        if cur is None:
            notes.append(f"{scenario} {eid}: in the reference, not measured in this run")
            continue
        if ref.get("status") == "completed" and cur.get("status") != "completed":
            regressions.append(Regression(eid, scenario, "status", "completed", cur.get("status")))
            continue
        for prop in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER):
            r, c = _number(ref.get(prop)), _number(cur.get(prop))
            if r is None or c is None:
                continue
            higher = prop in HIGHER_IS_BETTER
            if prop in FRACTIONS:
                worse = (r - c) if higher else (c - r)
                if worse > tolerance:
                    regressions.append(Regression(eid, scenario, prop, r, c, None))
                continue
            if r == 0:
                continue
            change = (c - r) / abs(r)
            if (higher and change < -tolerance) or (not higher and change > tolerance):
                regressions.append(Regression(eid, scenario, prop, r, c, change))
    return regressions, notes


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """A results.jsonl record as one flat row (the CSV's shape)."""
    row = {k: record.get(k) for k in ("experiment", "scenario", "entity_id", "status")}
    row.update(record.get("properties") or {})
    return row

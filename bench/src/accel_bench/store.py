"""The results of a matrix: ``results.jsonl`` (every attempt) and ``results.csv`` (the latest
record per entity), both rewritten atomically (temporary file + rename) after every run, so
an interrupted matrix loses at most the run in progress and resumes where it stopped.

Resume rules (the reference's): a *completed* or *invalid* entity is not run again; a
*failed* one recorded no properties and is retried on the next run of the matrix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accel.errors import ConfigError
from accel.helpers import write_atomic

from .outcome import COMPLETED, FAILED, INVALID
from .scenario import PARAMETERS

DONE = (COMPLETED, INVALID)
#: the reference's measured properties first, then accel's additions
PROPERTY_ORDER = (
    "is_valid",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_tokens_per_second",
    "train_tokens_per_gpu_per_second",
    "dataset_tokens_per_second",
    "dataset_tokens_per_second_per_gpu",
    "cpu_compute_utilization",
    "cpu_memory_utilization",
    "cpu_memory_peak_rss_mb",
    "cpu_memory_avg_rss_mb",
    "gpu_compute_utilization_min",
    "gpu_compute_utilization_avg",
    "gpu_compute_utilization_max",
    "gpu_memory_utilization_min",
    "gpu_memory_utilization_avg",
    "gpu_memory_utilization_max",
    "gpu_memory_utilization_peak",
    "gpu_power_watts_min",
    "gpu_power_watts_avg",
    "gpu_power_watts_max",
    "gpu_power_percent_min",
    "gpu_power_percent_avg",
    "gpu_power_percent_max",
    "gpu_memory_peak_allocated_mb",
    "f_gpu_oom",
    "f_other_error",
    "f_no_error",
    "final_loss",
    "first_loss",
    "train_tokens",
    "dataset_tokens",
    "train_steps",
    "warmup_seconds",
    "distributed",
)
BASE_COLUMNS = ("experiment", "scenario", "entity_id", "status", "reason", "attempt")


class ResultsStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.jsonl = self.dir / "results.jsonl"
        self.csv = self.dir / "results.csv"
        self.records: list[dict[str, Any]] = []
        if self.jsonl.is_file():
            for number, line in enumerate(self.jsonl.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(
                        f"{self.jsonl}: line {number} is not JSON; move the file away to start "
                        "a new result set"
                    ) from None

    def latest(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for record in self.records:
            out[record["entity_id"]] = record
        return out

    def status(self, entity_id: str) -> str | None:
        record = self.latest().get(entity_id)
        return record["status"] if record else None

    def attempts(self, entity_id: str) -> int:
        return sum(1 for r in self.records if r["entity_id"] == entity_id)

    def is_done(self, entity_id: str) -> bool:
        return self.status(entity_id) in DONE

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        write_atomic(self.jsonl, "".join(json.dumps(r, default=str) + "\n" for r in self.records))
        write_atomic(self.csv, to_csv(self.latest().values()))


def to_csv(records: Iterable[dict[str, Any]]) -> str:
    records = list(records)
    props: list[str] = [
        p for p in PROPERTY_ORDER if any(p in r.get("properties", {}) for r in records)
    ]
    for r in records:
        props += [p for p in r.get("properties", {}) if p not in props]
    params = [p for p in PARAMETERS if any(p in r.get("values", {}) for r in records)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *params, *props])
    for r in records:
        row = [r.get(c, "") for c in BASE_COLUMNS]
        row += [_cell(r.get("values", {}).get(p)) for p in params]
        row += [_cell(r.get("properties", {}).get(p)) for p in props]
        writer.writerow(row)
    return buf.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference results {str(path)!r} do not exist")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "entity_id" not in rows[0]:
        raise ConfigError(f"{path}: not an accel bench results.csv (no entity_id column)")
    return rows


__all__ = ["ResultsStore", "read_csv", "to_csv", "write_atomic", "DONE", "FAILED"]

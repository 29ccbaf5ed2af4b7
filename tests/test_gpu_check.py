"""The GPU check's dry run on CPU writes the report and raw files of the real run, so the
script cannot rot without a GPU; the wheel script's carry-limit check works offline."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_report_and_raw_files(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh", str(out), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert {s["name"]: s["status"] for s in steps} == {
        "env": "ok", "install": "skipped", "tests": "ok", "kernels": "ok", "e2e": "ok",
    }  # fmt: skip
    tests = json.loads((out / "tests.json").read_text())
    assert tests["counts"]["passed"] > 0 and tests["counts"]["failed"] == 0
    kernels = json.loads((out / "kernels.json").read_text())
    ops = {r["op"] for r in kernels["rows"] if r["impl"] == "accel" and r["status"] == "ok"}
    assert {"swiglu", "cross_entropy", "fused_linear_cross_entropy", "moe_scattered_linear"} <= ops
    assert all(r["ms"] > 0 for r in kernels["rows"] if r["status"] == "ok")
    with (out / "kernels.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(kernels["rows"])
    e2e = json.loads((out / "e2e.json").read_text())
    for name, variant in e2e["variants"].items():
        assert variant["status"] == "ok", (name, variant.get("log_tail"))
        assert variant["summary"]["train_tokens_per_s"] > 0 and variant["peak_memory_mb"] > 0
    report = (out / "report.md").read_text()
    for heading in ("## Steps", "## a)", "## b)", "## c)", "dry run"):
        assert heading in report


def _wheels_check(folder: Path, limit_mb: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS_LIMIT_MB": limit_mb}
    return subprocess.run(
        ["bash", "scripts/gpu-wheels.sh", "--check", str(folder)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_wheel_size_check_counts_checkout_and_folder(tmp_path):
    """No download: the size check alone, on a folder with one sparse 8 MiB file."""
    (tmp_path / "big.whl").write_bytes(b"")
    os.truncate(tmp_path / "big.whl", 8 * 2**20)
    fits = _wheels_check(tmp_path, "64")
    assert fits.returncode == 0, fits.stderr
    assert "total" in fits.stdout and "8.0 MiB" in fits.stdout
    over = _wheels_check(tmp_path, "8")  # the checkout itself adds more than 0 bytes
    assert over.returncode == 1
    assert "over the" in over.stderr
    missing = _wheels_check(tmp_path / "absent", "64")
    assert missing.returncode == 2

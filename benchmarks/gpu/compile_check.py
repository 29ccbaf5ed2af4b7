"""Compile gate: every Triton kernel of accel compiled for real NVIDIA GPUs, without a GPU.

Calls each public op (RMSNorm, SwiGLU/GeGLU, RoPE, cross-entropy, fused linear cross-entropy,
GPTQ dequantisation, the MoE grouped GEMM) on fake CUDA tensors of real model shapes, forward
and backward, in fp32/bf16/fp16; every launch the op makes is compiled for each target with
the ptxas bundled in Triton and judged from the cubin. One table per kernel; exit status 1
when anything fails: a compile error, shared memory over the target's per-block limit, more
than 255 registers, any spill (budget: 0 bytes), fewer than 2 blocks per SM by registers for
RMSNorm at hidden <= 8192, or an op that raises for a realistic shape.

    python benchmarks/gpu/compile_check.py --targets 80 90 [100] [--quick]
        [--ops rms_norm ...] [--report benchmarks/gpu/compile_report.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = (80, 90, 100)
HEADER = "| config | sm | dtype | launch | regs | spill st/ld B | smem KB | warps | blocks/SM | verdict |"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90], choices=TARGETS)
    parser.add_argument("--report", type=Path, help="also write the tables to this markdown file")
    parser.add_argument(
        "--quick", action="store_true", help="a cut of the matrix (bf16, few shapes)"
    )
    parser.add_argument("--ops", nargs="+", default=[], help="only these public ops, e.g. rms_norm")
    parser.add_argument("--jobs", type=int, default=0, help="processes (default: one per target)")
    return parser.parse_args(argv)


def _merge(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows per (op, kernel); launches that compiled to one binary share a row."""
    tables: dict[tuple[str, str], list[dict]] = {}
    by_key: dict[tuple, dict] = {}
    for row in rows:
        key = (row["op"], row["kernel"], row["target"], row["key"], row["dtype"])
        if row["key"] and key in by_key:
            seen = by_key[key]
            seen["configs"] += [c for c in row["configs"] if c not in seen["configs"]]
            seen["problems"] += [p for p in row["problems"] if p not in seen["problems"]]
            continue
        row = dict(row, configs=list(row["configs"]), problems=list(row["problems"]))
        by_key[key] = row
        tables.setdefault((row["op"], row["kernel"]), []).append(row)
    for table in tables.values():
        table.sort(key=lambda r: r["target"])  # stable: the matrix order within a target
    return tables


def _cell(row: dict) -> str:
    if row["registers"] is None:
        return f"| {'; '.join(row['configs'])} | {row['target']} | {row['dtype']} | | | | | | | FAIL: {'; '.join(row['problems'])} |"
    verdict = "ok" if not row["problems"] else "FAIL: " + "; ".join(row["problems"])
    return (
        f"| {'; '.join(row['configs'])} | {row['target']} | {row['dtype']} | {row['meta']} "
        f"| {row['registers']} | {row['spill_stores']}/{row['spill_loads']} "
        f"| {row['shared'] / 1024:.1f} | {row['num_warps']} | {row['blocks_per_sm']} | {verdict} |"
    )


def render(tables: dict[tuple[str, str], list[dict]]) -> str:
    parts = []
    for (op, kernel), rows in tables.items():
        parts += [f"### `{op}`: `{kernel}`", "", HEADER, "|" + "---|" * 10]
        parts += [_cell(r) for r in rows]
        parts.append("")
    return "\n".join(parts)


def summary(tables: dict[tuple[str, str], list[dict]]) -> tuple[str, int]:
    rows = [r for table in tables.values() for r in table]
    failed = [r for r in rows if r["problems"]]
    lines = [f"{len(rows)} kernel binaries/cases, {len(failed)} failing."]
    for r in failed:
        lines.append(
            f"- FAIL `{r['kernel']}` sm_{r['target']} {r['dtype']} ({'; '.join(r['configs'])}): "
            + "; ".join(r["problems"])
        )
    return "\n".join(lines), len(failed)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def report(args: argparse.Namespace, body: str, result: str, seconds: float) -> str:
    import torch
    import triton
    from compile_gate.resources import MAX_REGISTERS, SPILL_BUDGET
    from compile_gate.standin import SHARED_PER_BLOCK

    targets = " ".join(str(t) for t in args.targets)
    limits = ", ".join(f"sm_{t} {SHARED_PER_BLOCK[t] // 1024} KB" for t in args.targets)
    return "\n".join(
        [
            "# Compile gate: accel's Triton kernels compiled for real GPUs",
            "",
            f"Generated by `python benchmarks/gpu/compile_check.py --targets {targets}"
            f"{' --quick' if args.quick else ''} --report ...` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds:.0f} s.",
            "",
            f"- Machine: {_machine()} (no GPU: a stand-in driver and fake CUDA tensors)",
            f"- Python {platform.python_version()}, torch {torch.__version__}, "
            f"triton {triton.__version__} (its bundled ptxas and cuobjdump)",
            "- Each row is one compiled binary; the configs listed share it. Registers, stack "
            "and static shared memory from `cuobjdump --dump-resource-usage` on the cubin, "
            "spills from the `ptxas -v` log of the compile, dynamic shared memory from "
            "Triton's launch metadata; blocks/SM = floor(65536 / (regs rounded up to 8 x 32 x "
            "warps)), capped at 2048 threads and 32 blocks per SM.",
            f"- Fails on: a compile error; shared memory per block over {limits}; more than "
            f"{MAX_REGISTERS} registers; spills over {SPILL_BUDGET} bytes (stores + loads per "
            "thread) for every kernel; RMSNorm below 2 blocks/SM at hidden <= 8192; an op "
            "that raises for a realistic shape.",
            "",
            "## Result",
            "",
            result,
            "",
            "## Kernels",
            "",
            body,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="accel-compile-gate-")
    os.environ["TRITON_CACHE_DIR"] = cache  # compile for real: ptxas logs for every kernel
    try:
        from compile_gate.run import run_target

        targets = list(dict.fromkeys(args.targets))
        jobs = args.jobs or min(len(targets), os.cpu_count() or 1)
        if jobs <= 1:
            results = [run_target(t, args.quick, tuple(args.ops)) for t in targets]
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                runs = [pool.submit(run_target, t, args.quick, tuple(args.ops)) for t in targets]
                results = [run.result() for run in runs]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    tables = _merge([row for rows in results for row in rows])
    body = render(tables)
    result, n_failed = summary(tables)
    seconds = time.perf_counter() - started
    print(body)
    print(result)
    print(f"compile gate: {'FAILED' if n_failed else 'passed'} in {seconds:.0f} s")
    if args.report is not None:
        from accel.api import write_atomic

        write_atomic(args.report, report(args, body, result, seconds) + "\n")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU thread defaults: the 60-step demo run alone, beside one busy process, and as a
2-process DDP run (gloo), with torch's own OpenMP defaults and with accel's; plus DDP with
``find_unused_parameters`` on and off.

Every run is a fresh ``python -m accel.cli train --demo --max_steps 60`` (2-process runs go
through ``torch.distributed.run``); the time is the training loop's ``runtime_s`` from the
summary (start-up and imports excluded). The busy process is ``python -c "while True:
pass"``. The load average before each run is recorded, since other work on the machine
counts too.

    OMP_NUM_THREADS= python benchmarks/cpu/threads.py --repeats 5 > benchmarks/cpu/threads_cpu.md

``OMP_*`` variables of the calling shell are removed for the runs (each variant sets its own).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

STEPS = 60

#: name -> environment changes (None removes the variable)
VARIANTS = {
    "torch defaults": {"ACCEL_CPU_THREADS": "off"},
    "accel defaults": {},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "ACCEL_CPU"))}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


@contextmanager
def busy(count: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def one_run(env: dict[str, str], processes: int, extra: list[str], out: Path) -> float:
    train = ["-m", "accel.cli", "train", "--demo", "--max_steps", str(STEPS)]
    train += ["--output_dir", str(out), "--eval_strategy", "no", *extra]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd += ["--master_port", str(29500 + os.getpid() % 1000), *train]
    else:
        cmd = [sys.executable, *train]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    match = re.search(r"^runtime_s\s*:\s*([\d.]+)", done.stdout, re.M)
    if match is None:
        raise RuntimeError(f"no runtime_s in the output:\n{done.stdout[-2000:]}")
    return float(match.group(1))


def measure(
    variant: dict[str, str], processes: int, busy_count: int, repeats: int, extra: list[str]
) -> tuple[list[float], list[float]]:
    env = base_env()
    env.update(variant)
    times, loads = [], []
    with tempfile.TemporaryDirectory() as tmp, busy(busy_count):
        for i in range(repeats):
            loads.append(os.getloadavg()[0])
            times.append(one_run(env, processes, extra, Path(tmp) / f"run{i}"))
    return times, loads


def cell(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def versions() -> str:
    import torch
    import transformers

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cpu}, {cores} usable cores; Python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-threads", action="store_true", help="only the DDP table")
    parser.add_argument("--skip-ddp", action="store_true", help="only the thread table")
    args = parser.parse_args()
    print("# CPU threads and DDP: 60-step `accel train --demo`\n")
    print(versions() + "\n")
    print(
        f"Training-loop seconds (`runtime_s`), median (min-max) of {args.repeats} runs; "
        "load: 1-minute load average before the runs (min-max).\n"
    )
    if not args.skip_threads:
        rows = [("1 process", 1, 0), ("1 process + 1 busy", 1, 1)]
        rows += [("2 processes (DDP)", 2, 0), ("2 processes (DDP) + 1 busy", 2, 1)]
        print("| condition | " + " | ".join(VARIANTS) + " | load |")
        print("|---" * (len(VARIANTS) + 2) + "|")
        for label, processes, busy_count in rows:
            cells, all_loads = [], []
            for variant in VARIANTS.values():
                times, loads = measure(variant, processes, busy_count, args.repeats, [])
                cells.append(cell(times))
                all_loads += loads
                print(f"  {label} {variant}: {times}", file=sys.stderr, flush=True)
            load = f"{min(all_loads):.2f}-{max(all_loads):.2f}"
            print(f"| {label} | " + " | ".join(cells) + f" | {load} |", flush=True)
        print()
    if not args.skip_ddp:
        print("DDP, 2 processes on gloo, accel's thread defaults:\n")
        print("| find_unused_parameters | seconds | load |")
        print("|---|---|---|")
        for value in ("True", "False"):
            flag = ["--ddp_find_unused_parameters", value]
            times, loads = measure({}, 2, 0, args.repeats, flag)
            print(f"  find_unused {value}: {times}", file=sys.stderr, flush=True)
            load = f"{min(loads):.2f}-{max(loads):.2f}"
            print(f"| {value} | {cell(times)} | {load} |", flush=True)


if __name__ == "__main__":
    main()

"""``accel bench <scenario.yaml> --output <dir>``: the fine-tuning experiment matrix.

Runs every entity of the scenario (ado's SFTTrainer experiments on this project's trainer),
appends each result as it ends (resumable), writes ``report.md`` and the PNG plots, and with
``--compare reference.csv`` exits 1 when a property regressed. Scenario errors are one
``accel: error:`` line, exit 2, before anything runs. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

HELP = "run a fine-tuning experiment matrix from a scenario YAML (see docs/bench.md)"
DESCRIPTION = (
    "run a fine-tuning experiment matrix (ado SFTTrainer experiments: finetune_full_benchmark, "
    "finetune_lora_benchmark, finetune_gptq-lora_benchmark, finetune_pt_benchmark, "
    "finetune_full_stability) from a scenario YAML; results are appended as each run ends "
    "(rerun to resume), with a markdown report and plots; --compare gates on regressions"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario YAML (experiment, entities and/or space)")
    parser.add_argument(
        "--output", required=True, help="results folder (created; reused to resume)"
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="REFERENCE_CSV",
        help="a results.csv to compare with; exit 1 if any property regressed",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="relative worsening allowed by --compare (default 0.10)",
    )
    parser.add_argument(
        "--max-runs",
        type=int,
        default=None,
        help="stop after this many runs (the rest run on the next invocation)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one run may take before it is killed and counted failed",
    )
    parser.add_argument(
        "--master-port",
        type=int,
        default=29600,
        help="first torchrun port; runs use this and the next 49 (default 29600)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the entities, their ids and validity; run nothing",
    )


def run(args: argparse.Namespace) -> int:
    return run_bench(args)


def run_bench(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from accel.errors import ConfigError
    from accel_bench.compare import compare
    from accel_bench.models import num_experts
    from accel_bench.runner import Matrix
    from accel_bench.scenario import invalid_reasons, load_scenarios
    from accel_bench.store import read_csv

    if not 0 <= args.tolerance < 10:
        raise ConfigError(f"--tolerance {args.tolerance} must be between 0 and 10 (0.10 = 10%)")
    if args.max_runs is not None and args.max_runs < 0:
        raise ConfigError("--max-runs must be 0 or more")
    if not 1024 <= args.master_port <= 65535 - 49:
        raise ConfigError(f"--master-port {args.master_port} must be in 1024..65486")
    scenarios = load_scenarios(args.scenario)
    reference = read_csv(args.compare) if args.compare else None  # checked before running
    if args.dry_run:
        for s in scenarios:
            print(f"{s.name} ({s.experiment}):")
            for e in s.entities:
                experts = num_experts(str(e.values["model_name"])) if e.values["fast_moe"] else None
                reasons = invalid_reasons(e.values, experts)
                state = "invalid: " + "; ".join(reasons) if reasons else "valid"
                base = " (baseline)" if e.is_baseline else ""
                print(f"  {e.entity_id}{base}: {e.label(s.varying())} [{state}]")
        return 0
    _terminate_as_interrupt()
    matrix = Matrix(
        scenarios,
        args.output,
        master_port=args.master_port,
        timeout=args.timeout,
        max_runs=args.max_runs,
        progress=not args.no_progress,
    )
    summary = matrix.run()
    words = list(argv if argv is not None else sys.argv[1:])
    if words and words[0] == "bench":
        words = words[1:]
    command = "accel bench " + " ".join(shlex.quote(a) for a in words)
    matrix.write_report(command, summary, plot=not args.no_plot)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.statuses.items())) or "nothing new"
    print(
        f"accel bench: {summary.ran} run(s) this time ({counts}); {summary.skipped_done} already "
        f"done; results in {matrix.store.csv}, report {summary.report}"
    )
    for line in summary.skipped:
        print(f"accel bench: skipped {line}")
    for plot in summary.plots:
        print(f"accel bench: plot {plot}")
    if summary.stopped_early:
        print("accel bench: stopped at --max-runs; run the same command again to continue")
    if reference is None:
        return 0
    current = read_csv(matrix.store.csv)
    regressions, notes = compare(current, reference, args.tolerance)
    for note in notes:
        print(f"accel bench: note: {note}")
    if regressions:
        print(
            f"accel bench: {len(regressions)} regression(s) against {args.compare} "
            f"(tolerance {args.tolerance:.0%}):"
        )
        for r in regressions:
            print(f"  {r}")
        return 1
    print(f"accel bench: no regression against {args.compare} (tolerance {args.tolerance:.0%})")
    return 0


def _terminate_as_interrupt() -> None:
    """SIGTERM (a CI job cancelled, ``kill``) stops the matrix like Ctrl-C: the run in progress
    is killed with its process group, the results so far stay, the same command resumes."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)

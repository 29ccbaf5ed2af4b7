"""Packing quality and speed of MultipackBatchSampler on synthetic length sets.

For each length distribution, token budget and number of simulated ranks, reports:
- efficiency: real tokens / (steps x ranks x budget), target >= 99%;
- balance: mean over steps of (max tokens of a rank) / (min tokens of a rank), target <= 1.02;
- the planner's run time for the whole epoch (all ranks are planned at once; each rank
  of a real run computes the same plan);
- for contrast, the balance of plain random batches with the same mean tokens per batch.

Usage: python benchmarks/attention_packing/packing_quality.py [--examples 1000000]
           [--out benchmarks/attention_packing/packing_quality.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

from accel_attention_packing.multipack import plan_epoch  # noqa: E402


def length_sets(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "lognormal(5.0, 0.9) clip 16..1024": np.clip(rng.lognormal(5.0, 0.9, n), 16, 1024).astype(
            np.int64
        ),
        "lognormal(4.0, 1.2) clip 16..1024": np.clip(rng.lognormal(4.0, 1.2, n), 16, 1024).astype(
            np.int64
        ),
        "uniform 16..1024": rng.integers(16, 1025, n),
    }


def random_batch_balance(lengths: np.ndarray, replicas: int, budget: int, seed: int) -> float:
    """Mean max/min tokens per step when each rank takes k random examples (k chosen so a
    batch holds `budget` tokens on average), i.e. what padding-free without multipack does."""
    k = max(1, int(round(budget / lengths.mean())))
    order = np.random.default_rng(seed).permutation(lengths.size)
    steps = lengths.size // (k * replicas)
    tokens = lengths[order[: steps * k * replicas]].reshape(steps, replicas, k).sum(axis=2)
    return float(np.mean(tokens.max(axis=1) / tokens.min(axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows = []
    for name, lengths in length_sets(args.examples, args.seed).items():
        for budget in args.budgets:
            for replicas in args.ranks:
                start = time.perf_counter()
                plan = plan_epoch(
                    lengths, num_replicas=replicas, max_tokens_per_rank=budget, seed=args.seed
                )
                seconds = time.perf_counter() - start
                assert plan.real_tokens == int(lengths.sum())
                assert int(plan.step_tokens().max()) <= budget
                rows.append(
                    (
                        name,
                        budget,
                        replicas,
                        plan.num_steps,
                        plan.efficiency(),
                        plan.imbalance(),
                        random_batch_balance(lengths, replicas, budget, args.seed)
                        if replicas > 1
                        else float("nan"),
                        seconds,
                    )
                )
                print(rows[-1], flush=True)

    import torch

    lines = [
        "# Multipack packing quality",
        "",
        f"- command: `python benchmarks/attention_packing/packing_quality.py "
        f"--examples {args.examples} --budgets {' '.join(map(str, args.budgets))} "
        f"--ranks {' '.join(map(str, args.ranks))} --seed {args.seed}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average at start {load_before[0]:.1f}), "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}",
        f"- {args.examples:,} examples per length set; budget = max tokens per rank per step; "
        "targets: efficiency >= 99%, balance <= 1.02",
        "- efficiency = real tokens / (steps x ranks x budget); balance = mean over steps of "
        "max/min tokens across ranks; random = same for random batches of "
        "round(budget / mean length) examples (padding-free without multipack)",
        "- plan time = one call of `plan_epoch` for the whole epoch (every rank computes the "
        "same plan)",
        "",
        "| lengths | budget | ranks | steps | efficiency | balance | random batches balance "
        "| plan time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, budget, replicas, steps, eff, bal, rnd, sec in rows:
        rnd_s = "-" if np.isnan(rnd) else f"{rnd:.3f}"
        lines.append(
            f"| {name} | {budget} | {replicas} | {steps} | {eff * 100:.2f}% | {bal:.5f} "
            f"| {rnd_s} | {sec:.2f} |"
        )
    worst_eff = min(r[4] for r in rows)
    worst_bal = max(r[5] for r in rows)
    lines += [
        "",
        f"Lowest efficiency {worst_eff * 100:.2f}% (target >= 99%), highest balance "
        f"{worst_bal:.5f} (target <= 1.02), slowest plan {max(r[7] for r in rows):.2f} s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

"""Packing quality and speed of accel's multipack planner, alone and beside its peers.

Definitions (used for every planner):
- efficiency = tokens packed / (steps x ranks x budget): the share of the token slots a run
  pays for (every rank waits for a full micro-batch of ``budget`` tokens each step) that
  hold real tokens. Tokens of dropped examples are not packed.
- fewest steps = ceil(tokens / (ranks x budget)): no planner that drops nothing can use
  fewer; "bound" is the efficiency at that many steps.
- balance = mean over steps of (max tokens of a rank) / (min tokens of a rank).
- dropped = examples of the epoch that no rank trains on.
- plan time = CPU time of what one rank computes (accel and axolotl plan all ranks at once;
  fms-aadp runs its allocator once per rank), numba JIT excluded (warmed up first). CPU
  time, not wall clock, because the machine is shared: every planner is single-threaded.

Part 1: accel on 1M examples per length set (and the 200k case of issue 12). Part 2: accel,
fms-acceleration-aadp 0.2.2 (imoneoi's multipack ``allocate``) and axolotl 0.19.0
(``pack_parallel``) on the same lengths. Peers that cannot be imported are skipped with the
reason (install them with ``pip install --no-deps -r requirements/bench.txt``).

Usage: python benchmarks/attention_packing/packing_quality.py [--examples 1000000]
           [--peer-examples 200000] [--out benchmarks/attention_packing/packing_quality.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from accel_attention_packing.multipack import plan_epoch  # noqa: E402

ISSUE_CASE = ("lognormal(5.0, 0.9) clip 16..1024", 200_000, 16384, 64)


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


@dataclass
class Result:
    steps: int
    packed: int  # tokens packed
    balance: float
    dropped: int  # examples not trained
    seconds: float  # one rank's planning time


def _score(
    bins: list[list[np.ndarray]], lengths: np.ndarray, budget: int, seconds: float
) -> Result:
    """bins[step][rank] = example indices; checks the budget and that nothing repeats."""
    tokens = np.array([[int(lengths[b].sum()) for b in step] for step in bins], dtype=np.int64)
    if tokens.size and tokens.max() > budget:
        raise AssertionError(f"a micro-batch holds {tokens.max()} tokens > budget {budget}")
    seen = np.concatenate([b for step in bins for b in step] + [np.zeros(0, np.int64)])
    if np.unique(seen).size != seen.size:
        raise AssertionError("an example is packed twice")
    balance = float(np.mean(tokens.max(axis=1) / tokens.min(axis=1))) if tokens.size else 1.0
    return Result(len(bins), int(tokens.sum()), balance, lengths.size - seen.size, seconds)


def run_accel(lengths: np.ndarray, budget: int, ranks: int, seed: int) -> Result:
    start = time.process_time()
    plan = plan_epoch(lengths, num_replicas=ranks, max_tokens_per_rank=budget, seed=seed)
    seconds = time.process_time() - start
    bins = [
        [np.asarray(plan.batch(t, r), dtype=np.int64) for r in range(ranks)]
        for t in range(plan.num_steps)
    ]
    return _score(bins, lengths, budget, seconds)


def load_fms() -> Callable[..., Result]:
    """fms-acceleration-aadp's planner (imoneoi's ``allocate``), as its sampler calls it.

    The package's ``__init__`` imports the fms-acceleration plugin framework, which the
    planner does not need, so ``multipack_sampler.py`` is loaded as a file."""
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("fms_acceleration_aadp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fms-acceleration-aadp is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "multipack_sampler.py")
    file_spec = importlib.util.spec_from_file_location("fms_aadp_multipack_sampler", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    allocate = module.allocate
    warm = np.arange(1, 200, dtype=np.int64)
    allocate(warm, np.cumsum(warm), 0, 256, 2, False)  # numba JIT

    def run(lengths: np.ndarray, budget: int, ranks: int, seed: int) -> Result:
        # as MultipackDistributedBatchSampler.generate_batches with padding=False (padding-free)
        indices = np.random.default_rng(seed=seed).permutation(lengths.size)
        ordered = lengths[indices]
        cumsum = np.cumsum(ordered)
        per_rank, seconds = [], 0.0
        for rank in range(ranks):
            start = time.process_time()
            batches, _, _ = allocate(ordered, cumsum, rank, budget, ranks, False)
            seconds += time.process_time() - start
            per_rank.append([indices[np.asarray(b, dtype=np.int64)] for b in batches])
        steps = min(len(b) for b in per_rank)
        bins = [[per_rank[r][t] for r in range(ranks)] for t in range(steps)]
        return _score(bins, lengths, budget, seconds / ranks)

    return run


def load_axolotl() -> Callable[..., Result]:
    """axolotl's planner (``pack_parallel``, first-fit in the sampler's order) with its
    defaults (group_size 100000, bin_size 200); one process, as ``num_processes=1``."""
    from axolotl.utils.samplers.multipack import pack_parallel

    warm = np.arange(1, 200, dtype=np.int32)
    pack_parallel(warm, 256, 100_000, 200, num_processes=1)  # numba JIT

    def run(lengths: np.ndarray, budget: int, ranks: int, seed: int) -> Result:
        indices = np.random.default_rng(seed=seed).permutation(lengths.size)  # RandomSampler
        start = time.process_time()
        packed = pack_parallel(
            lengths[indices].astype(np.int32), budget, 100_000, 200, num_processes=1
        )
        seconds = time.process_time() - start
        # micro-batch = 1 bin; bins dealt to ranks in order (bin i to rank i % ranks), as a
        # sharded loader does; an incomplete last step is dropped
        steps = len(packed) // ranks
        bins = [
            [indices[np.asarray(packed[t * ranks + r], dtype=np.int64)] for r in range(ranks)]
            for t in range(steps)
        ]
        return _score(bins, lengths, budget, seconds)

    return run


def _versions() -> str:
    import importlib.metadata as md

    import torch

    parts = [
        f"Python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"torch {torch.__version__}",
    ]
    for dist in ("numba", "fms-acceleration-aadp", "axolotl"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{dist} {md.version(dist)}")
    return ", ".join(parts)


def _gap(row: tuple) -> float:
    """Bound minus efficiency of a side-by-side row (negative when examples were dropped)."""
    _, budget, ranks, fewest, _, res, total = row
    packed = res.packed / (res.steps * ranks * budget) if res.steps else 0.0
    return total / (fewest * ranks * budget) - packed


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--peer-examples", type=int, default=200_000)
    parser.add_argument("--peer-ranks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--no-peers", action="store_true", help="part 1 only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    wall = time.perf_counter()

    # -- part 1: accel alone ------------------------------------------------------------
    cases = [
        (name, lengths, budget, ranks)
        for name, lengths in length_sets(args.examples, args.seed).items()
        for budget in args.budgets
        for ranks in args.ranks
    ]
    name, n, budget, ranks = ISSUE_CASE
    cases.append((name, length_sets(n, args.seed)[name], budget, ranks))
    rows1 = []
    for name, lengths, budget, ranks in cases:
        res = run_accel(lengths, budget, ranks, args.seed)
        if res.dropped or res.packed != int(lengths.sum()):
            raise AssertionError("accel dropped examples")
        fewest = -(-int(lengths.sum()) // (ranks * budget))
        rnd = random_batch_balance(lengths, ranks, budget, args.seed) if ranks > 1 else None
        rows1.append((name, lengths.size, budget, ranks, fewest, res, rnd))
        print(rows1[-1][:5], res, flush=True)

    # -- part 2: side by side -----------------------------------------------------------
    rows2, skipped = [], []
    if not args.no_peers:
        planners: list[tuple[str, Callable[..., Result]]] = [("accel", run_accel)]
        for label, loader in (("fms-acceleration-aadp", load_fms), ("axolotl", load_axolotl)):
            try:
                planners.append((label, loader()))
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                skipped.append(f"{label}: skipped ({reason})")
                print(skipped[-1], file=sys.stderr, flush=True)
        for name, lengths in length_sets(args.peer_examples, args.seed).items():
            for budget in args.budgets:
                for ranks in args.peer_ranks:
                    fewest = -(-int(lengths.sum()) // (ranks * budget))
                    for label, run in planners:
                        res = run(lengths, budget, ranks, args.seed)
                        rows2.append((name, budget, ranks, fewest, label, res, int(lengths.sum())))
                        print(rows2[-1][:5], res, flush=True)

    # -- report -------------------------------------------------------------------------
    cmd = (
        "python benchmarks/attention_packing/packing_quality.py "
        f"--examples {args.examples} --budgets {' '.join(map(str, args.budgets))} "
        f"--ranks {' '.join(map(str, args.ranks))} --peer-examples {args.peer_examples} "
        f"--peer-ranks {' '.join(map(str, args.peer_ranks))} --seed {args.seed}"
        + (" --no-peers" if args.no_peers else "")
    )
    lines = [
        "# Multipack packing quality",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; whole run {time.perf_counter() - wall:.0f} s",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average at start {load_before[0]:.1f}); {_versions()}",
        "- budget = max tokens per rank per step. efficiency = tokens packed / (steps x ranks x "
        "budget); fewest steps = ceil(tokens / (ranks x budget)), the fewest any planner that "
        "drops nothing can use, and bound = the efficiency at that many steps; balance = mean "
        "over steps of max/min tokens across ranks; dropped = examples no rank trains on in "
        "the epoch; plan time = CPU time of one rank's planning (all planners run on one thread; "
        "numba JIT excluded)",
        "- targets: efficiency >= 99% where the bound allows, balance <= 1.001, nothing dropped",
        "",
        "## accel",
        "",
        "random batches balance = the same balance for random batches of round(budget / mean "
        "length) examples (padding-free without multipack).",
        "",
        "| lengths | examples | budget | ranks | steps | fewest steps | efficiency | bound "
        "| balance | random batches balance | dropped | plan CPU time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, budget, ranks, fewest, res, rnd in rows1:
        total = res.packed
        lines.append(
            f"| {name} | {n:,} | {budget} | {ranks} | {res.steps} | {fewest} "
            f"| {_pct(total / (res.steps * ranks * budget))} | {_pct(total / (fewest * ranks * budget))} "
            f"| {res.balance:.5f} | {'-' if rnd is None else f'{rnd:.3f}'} | {res.dropped} "
            f"| {res.seconds:.2f} |"
        )
    effs = [r[5].packed / (r[5].steps * r[3] * r[2]) for r in rows1]
    lines += [
        "",
        f"Lowest efficiency {_pct(min(effs))}, highest balance "
        f"{max(r[5].balance for r in rows1):.5f}, "
        f"{sum(r[5].steps == r[4] for r in rows1)}/{len(rows1)} cases at the fewest steps, "
        f"slowest plan {max(r[5].seconds for r in rows1):.2f} s.",
    ]
    if not args.no_peers:
        lines += [
            "",
            f"## Side by side ({args.peer_examples:,} examples per length set)",
            "",
            "- accel: `plan_epoch` (LPT + trades, every rank gets the same steps).",
            "- fms-acceleration-aadp: `allocate(..., padding=False)` once per rank, as its "
            "`MultipackDistributedBatchSampler` does with padding-free; it stops at the last "
            "full step and drops the rest of the epoch.",
            "- axolotl: `pack_parallel` on the shuffled epoch (defaults group_size 100000, "
            "bin_size 200, one process), micro-batch = 1 bin, bins dealt to ranks in order; "
            "an incomplete last step is dropped.",
        ]
        lines += [f"- {s}" for s in skipped]
        lines += [
            "",
            "| lengths | budget | ranks | planner | steps | fewest steps | efficiency | bound "
            "| balance | dropped (examples) | plan CPU time per rank (s) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, budget, ranks, fewest, label, res, total in rows2:
            lines.append(
                f"| {name} | {budget} | {ranks} | {label} | {res.steps} | {fewest} "
                f"| {_pct(res.packed / (res.steps * ranks * budget)) if res.steps else '-'} "
                f"| {_pct(total / (fewest * ranks * budget))} | {res.balance:.5f} "
                f"| {res.dropped} ({res.dropped / args.peer_examples:.2%}) | {res.seconds:.2f} |"
            )
        lines += [
            "",
            "Per planner over these cases (an efficiency above the bound comes from dropping "
            "examples):",
            "",
            "| planner | cases | steps = fewest | with drops | most dropped | lowest "
            "efficiency | most below bound | highest balance | mean plan CPU time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, _ in planners:
            mine = [r for r in rows2 if r[4] == label]
            lines.append(
                f"| {label} | {len(mine)} | {sum(r[5].steps == r[3] for r in mine)} "
                f"| {sum(r[5].dropped > 0 for r in mine)} "
                f"| {max(r[5].dropped for r in mine) / args.peer_examples:.2%} "
                f"| {_pct(min(r[5].packed / (r[5].steps * r[2] * r[1]) for r in mine))} "
                f"| {_pct(max(max(0.0, _gap(r)) for r in mine))} "
                f"| {max(r[5].balance for r in mine):.5f} "
                f"| {np.mean([r[5].seconds for r in mine]):.2f} |"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(report)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

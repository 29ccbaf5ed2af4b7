"""Multipack: group examples into per-rank micro-batches of (almost) equal token counts.

With padding-free batches, the cost of a micro-batch is its token count, and in
data-parallel training every step waits for the slowest rank. Random batches of k examples
give ranks very different token counts when lengths are long-tailed. Multipack fixes the
number of bins (micro-batches) of an epoch and fills them so their token counts are nearly
equal, then gives each rank one bin per step.

Algorithm (a multifit-style scheme, chosen over first-fit-decreasing because it balances
bins instead of filling early bins and leaving a ragged tail):

1. shuffle the examples with ``(seed, epoch)``, then sort by length, longest first (the
   shuffle breaks ties, so bins differ from epoch to epoch);
2. choose the number of bins ``m`` (a multiple of ``num_replicas``): with a token budget
   ``C``, the fewest for which step 3 fits every bin within ``C`` (below); with
   ``batch_size`` semantics, as many bins as a padded run with that per-device batch size
   would have steps;
3. longest-processing-time (LPT) assignment: each example, longest first, goes to the bin
   with the fewest tokens so far (computed in vectorised rounds, ~0.1 s per million
   examples). Bins end within about one shortest example of each other;
4. with a budget, bins that LPT left just over it trade single examples with bins that
   have room (a longer example for a shorter one) until every bin fits;
5. sort bins by tokens and cut them into steps of ``num_replicas`` bins, so the bins that
   run together are the most alike; shuffle the order of steps.

Step 2 with a budget tries ``m = ceil(tokens / (C - slack))`` rounded up to whole steps for
``slack`` = 0 (the fewest bins that can hold the tokens at all), 1, 2, 4, ... (and the
shortest example's length), and keeps the first ``m`` whose bins all fit after steps 3-4.
When the trades succeed at ``slack`` = 0 (typical when bins would keep ~10 tokens of room
on average), no planner that drops nothing needs fewer steps; room for one shortest
example per bin fits without trades in practice, for an efficiency of about
``1 - (shortest example) / C`` minus rounding to whole steps; larger slack serves long
examples that crowd bins. Once ``m`` reaches a bound that is guaranteed to fit, the bound
is used. Bound: when the j-th example (size
s_j, with P_j tokens placed before it) is placed, the emptiest bin holds at most P_j / m
tokens, so no bin exceeds ``max_j (P_j / m + s_j)``; the first m examples open their own
bins.

Efficiency here is tokens packed / (steps x ranks x C): the share of the token slots the
run pays for that hold real tokens. Balance is (max tokens of a rank) / (min tokens of a
rank) at a step, averaged over steps: every bin ends between the lowest LPT load and ``C``
and alike bins share a step, so it is 1.0000x in practice.

Every example appears exactly once per epoch across all ranks, except (a) examples longer
than the budget with ``oversize="report"`` (skipped and reported) and (b) when there are
fewer examples than bins (fewer than ``num_replicas`` examples, or very long ones): empty
bins are filled by repeating the shortest examples (``drop_last=False``, counted in
``PackingPlan.num_padding``) or the steps holding them are dropped (``drop_last=True``,
listed in ``PackingPlan.dropped``). No more than ``num_replicas - 1`` bins are ever empty.
"""

from __future__ import annotations

import heapq
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from accel.api import ConfigError

logger = logging.getLogger(__name__)


class PackingError(ConfigError, ValueError):
    """The user's settings make the packing impossible (examples over the token budget with
    ``oversize="error"``, nothing left to pack): an accel error, so the CLI prints one line."""


Oversize = Literal["error", "report"]


@dataclass(frozen=True)
class PackingPlan:
    """The batches of one epoch, for all ranks.

    ``indices[bin_offsets[b]:bin_offsets[b + 1]]`` are the examples of bin ``b``;
    ``step_bins[t, r]`` is the bin that rank ``r`` trains on at step ``t``.
    """

    indices: np.ndarray
    bin_offsets: np.ndarray
    bin_tokens: np.ndarray
    step_bins: np.ndarray
    capacity: int | None
    num_padding: int = 0
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    real_tokens: int = 0

    @property
    def num_steps(self) -> int:
        return int(self.step_bins.shape[0])

    @property
    def num_replicas(self) -> int:
        return int(self.step_bins.shape[1])

    def batch(self, step: int, rank: int) -> list[int]:
        """Example indices of ``rank`` at ``step``."""
        b = int(self.step_bins[step, rank])
        return self.indices[self.bin_offsets[b] : self.bin_offsets[b + 1]].tolist()

    def step_tokens(self) -> np.ndarray:
        """Tokens per (step, rank), shape (num_steps, num_replicas)."""
        return self.bin_tokens[self.step_bins]

    def efficiency(self) -> float:
        """Real tokens / provisioned tokens (steps x ranks x budget). Without a budget
        (``batch_size`` semantics) the largest micro-batch stands for the budget."""
        if self.num_steps == 0:
            return 0.0
        cap = self.capacity if self.capacity is not None else int(self.step_tokens().max())
        return self.real_tokens / (self.num_steps * self.num_replicas * cap)

    def imbalance(self) -> float:
        """Mean over steps of (max tokens of a rank) / (min tokens of a rank); 1.0 is even."""
        if self.num_steps == 0:
            return 1.0
        tok = self.step_tokens().astype(np.float64)
        return float(np.mean(tok.max(axis=1) / tok.min(axis=1)))


def _as_lengths(lengths: Any) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D sequence of ints, got shape {arr.shape}")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))
    )
    if arr.size and not integral:
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 1:
        bad = int(np.flatnonzero(arr < 1)[0])
        raise ValueError(
            f"example {bad} has length {int(arr[bad])}; every example needs at least one token"
        )
    return arr


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def _bins_for_budget(sizes: np.ndarray, capacity: int, num_replicas: int) -> int:
    """Smallest multiple of num_replicas for which LPT provably keeps bins <= capacity.

    ``sizes`` are sorted, longest first, and each is <= capacity."""
    n = sizes.size
    before = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.float64)
    room = (capacity - sizes).astype(np.float64)
    m = max(num_replicas, _round_up(-(-int(sizes.sum()) // capacity), num_replicas))
    while m < n:
        tail_room = room[m:]
        full = np.flatnonzero(tail_room <= 0)
        if full.size:  # an example that fills a bin alone must open its own bin
            need = m + int(full[-1]) + 1
        else:
            need = int(np.ceil((before[m:] / tail_room).max() - 1e-9))
        need = _round_up(max(need, 1), num_replicas)
        if need <= m:
            break
        m = need
    return m


# Below this many open bins per round, _fill hands the rest to the heap (fewer numpy calls).
_MIN_ROUND = 16
# Bins an over-full bin tries to trade with before the attempt is given up: the roomiest
# ones, then random roomy ones.
_HEAP_PARTNERS = 8
_RANDOM_PARTNERS = 40
# More over-full bins than this (each costs a trade, ~30 us) and _repair declines: the next
# bin count, with more room per bin, is cheaper to pack and costs little efficiency.
_REPAIR_MAX_BINS = 8192


def _lpt_rest(sizes: Sequence[int], loads: np.ndarray) -> list[int]:
    """Longest-processing-time assignment of ``sizes`` (longest first) to bins already
    holding ``loads`` tokens: each item to the emptiest bin, ties to the lowest bin id."""
    num_bins = loads.size
    # heap of load * num_bins + bin: ints compare fast and ties go to the lowest bin id
    heap = [int(x) * num_bins + b for b, x in enumerate(loads.tolist())]
    heapq.heapify(heap)
    replace = heapq.heapreplace
    out: list[int] = []
    append = out.append
    for size in sizes:
        top = heap[0]
        append(top % num_bins)
        replace(heap, top + size * num_bins)
    return out


def _fill(sizes: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest-processing-time (LPT) assignment of ``sizes`` (sorted, longest first) to
    ``num_bins`` bins, computed in vectorised rounds; returns (bin of each item, loads).

    The result is exactly that of LPT (each item to the emptiest bin, ties to the lowest
    id): a round gives the next items, longest first, to the emptiest bins in order, but
    only to bins below ``low + s``, where ``low`` is the lowest load and ``s`` the round's
    shortest item. Every bin that received an item this round is then at ``>= low + s``,
    above all bins still waiting, so LPT would pick exactly these bins in this order. A
    round costs a few numpy calls instead of one heap operation per item (~30x faster);
    when rounds get small (few bins far below the rest) the heap finishes the job."""
    n = sizes.size
    bin_of = np.empty(n, dtype=np.int64)
    loads = np.zeros(num_bins, dtype=np.int64)
    first = min(n, num_bins)
    bin_of[:first] = np.arange(first)
    loads[:first] = sizes[:first]
    pos = first
    while pos < n:
        low = loads.min()
        open_bins = np.flatnonzero(loads < low + sizes[pos])
        last = min(pos + open_bins.size, n) - 1
        if sizes[last] < sizes[pos]:
            open_bins = np.flatnonzero(loads < low + sizes[last])
        take = min(open_bins.size, n - pos)
        if take < _MIN_ROUND and n - pos > take:
            bin_of[pos:] = _lpt_rest(sizes[pos:].tolist(), loads)
            loads = np.bincount(bin_of, weights=sizes, minlength=num_bins).astype(np.int64)
            break
        chosen = open_bins[np.argsort(loads[open_bins], kind="stable")[:take]]
        bin_of[pos : pos + take] = chosen
        loads[chosen] += sizes[pos : pos + take]
        pos += take
    return bin_of, loads


def _best_trade(
    a_sizes: np.ndarray, b_sizes: np.ndarray, need: int, room: int, target: float
) -> tuple[int, int, int] | None:
    """A trade between a bin ``need`` tokens over the budget and one with ``room`` tokens
    free: example ``a`` (index i into ``a_sizes``) for ``b`` (index j, ``-1`` = nothing,
    a move), as (i, j, a - b), or None.

    Prefers ``need <= a - b <= room`` with ``a - b`` closest to ``target``; failing that,
    the largest ``a - b <= room`` (a partial fix: the full bin then trades again)."""
    order = b_sizes.argsort(kind="stable")
    sb = np.concatenate(([0], b_sizes[order]))
    first = sb.searchsorted(a_sizes - room, side="left")  # smallest b with a - b <= room
    for least, goal in ((need, target), (1, float(room))):
        last = sb.searchsorted(a_sizes - least, side="right") - 1  # a - b >= least
        valid = (first <= last).nonzero()[0]
        if valid.size == 0:
            continue
        a_v, lo, hi = a_sizes[valid], first[valid], last[valid]
        j = np.minimum(np.maximum(sb.searchsorted(a_v - goal), lo), hi)
        j_prev = np.maximum(j - 1, lo)
        cost, cost_prev = np.abs(a_v - sb[j] - goal), np.abs(a_v - sb[j_prev] - goal)
        better = cost_prev < cost
        k = int(np.where(better, cost_prev, cost).argmin())
        jj = int(j_prev[k] if better[k] else j[k])
        return int(valid[k]), (int(order[jj - 1]) if jj else -1), int(a_v[k] - sb[jj])
    return None


def _repair(sizes: np.ndarray, bin_of: np.ndarray, loads: np.ndarray, capacity: int) -> bool:
    """Bring every bin to ``<= capacity`` by moving or swapping single examples.

    LPT leaves bins within about one shortest example of each other, so when the average
    room per bin is below that, some bins end just over the budget while others have room.
    Each over-full bin (most over first) trades with roomy bins (the roomiest, then random
    ones): an example ``a`` for an example ``b`` of the other bin (or nothing) with
    ``excess <= a - b <= room``, the one leaving the two bins closest to each other, or
    else the largest ``a - b <= room`` and a further trade. No trade pushes a bin over the
    budget or below its load after LPT, so bins stay as even as LPT left them.

    Updates ``bin_of`` and ``loads`` in place. Returns False (leaving them unusable) when a
    bin finds no trade, or up front when the spare room is under twice the excess (trades
    are then rarely found) or more than ``_REPAIR_MAX_BINS`` bins are over."""
    over = np.flatnonzero(loads > capacity)
    if over.size == 0:
        return True
    excess = int((loads[over] - capacity).sum())
    if over.size > _REPAIR_MAX_BINS or loads.size * capacity - int(loads.sum()) < 2 * excess:
        return False
    by_bin = np.argsort(bin_of, kind="stable")
    offsets = np.concatenate(([0], np.cumsum(np.bincount(bin_of, minlength=loads.size))))
    members: dict[int, np.ndarray] = {}

    def items(b: int) -> np.ndarray:
        got = members.get(b)
        if got is None:
            got = members[b] = by_bin[offsets[b] : offsets[b + 1]]
        return got

    load = loads.tolist()
    roomy = np.flatnonzero(loads < capacity)
    heap = list(zip(loads[roomy].tolist(), roomy.tolist()))  # (load, bin): most room first
    heapq.heapify(heap)
    # LPT makes runs of bins with identical contents, so the roomiest bins are often alike:
    # most partners are drawn at random among the roomy bins (fixed seed).
    draws = np.random.default_rng(0)

    def partners() -> Iterator[int]:
        popped: list[tuple[int, int]] = []
        try:
            while heap and len(popped) < _HEAP_PARTNERS:
                entry = heapq.heappop(heap)
                if entry[0] == load[entry[1]]:  # else stale: the bin traded since
                    popped.append(entry)
                    yield entry[1]
            for u in draws.choice(roomy, _RANDOM_PARTNERS).tolist():
                if load[u] < capacity:
                    yield u
        finally:
            for entry in popped:
                if entry[0] == load[entry[1]]:
                    heapq.heappush(heap, entry)

    for o in over[np.argsort(-loads[over], kind="stable")].tolist():
        while load[o] > capacity:
            trade = None
            a_idx = items(o)
            tries = partners()
            for u in tries:
                b_idx = items(u)
                trade = _best_trade(
                    sizes[a_idx],
                    sizes[b_idx],
                    load[o] - capacity,
                    capacity - load[u],
                    (load[o] - load[u]) / 2,
                )
                if trade is not None:
                    break
            tries.close()  # puts the roomiest bins it took back on the heap
            if trade is None:
                return False
            i, j, delta = trade
            a = int(a_idx[i])
            if j < 0:  # move a
                members[o] = np.delete(a_idx, i)
                members[u] = np.append(b_idx, a)
            else:  # swap a and b
                b = int(b_idx[j])
                members[o] = a_idx.copy()
                members[o][i] = b
                members[u] = b_idx.copy()
                members[u][j] = a
                bin_of[b] = o
            bin_of[a] = u
            load[o] -= delta
            load[u] += delta
            if load[u] < capacity:
                heapq.heappush(heap, (load[u], u))
        if load[o] < capacity:
            heapq.heappush(heap, (load[o], o))
    loads[:] = load
    return True


def _pack_to_budget(sizes: np.ndarray, capacity: int, num_replicas: int) -> tuple[int, np.ndarray]:
    """LPT packing within ``capacity`` with as few bins as practical: (bins, bin of item).

    Tries bin counts from the fewest possible (``ceil(tokens / capacity)``, rounded up to
    whole steps) upwards, each leaving ``slack`` tokens of room per bin on average with
    ``slack`` = 0, 1, 2, 4, ... (and the shortest example's length on the way); each try is
    LPT (:func:`_fill`) then :func:`_repair`. The first count whose bins all fit wins. Past
    the count from :func:`_bins_for_budget`, which provably fits, that count is used. (Slack
    beyond the shortest example matters when long examples crowd bins: 200k examples of
    ~960 tokens among short ones fit 4 to a 4096-token bin, so bins need ~130 tokens of
    average room; the bound alone would leave ~20%.)"""
    safe = _bins_for_budget(sizes, capacity, num_replicas)
    total, shortest = int(sizes.sum()), int(sizes[-1])
    slack, last = 0, 0
    while slack < capacity:
        m = max(num_replicas, _round_up(-(-total // (capacity - slack)), num_replicas))
        if m >= safe:
            break
        if m > last:
            last = m
            bin_of, loads = _fill(sizes, m)
            if _repair(sizes, bin_of, loads, capacity):
                return m, bin_of
        step = max(1, 2 * slack)
        slack = shortest if slack < shortest < step else step
    return safe, _fill(sizes, safe)[0]


def plan_epoch(
    lengths: Any,
    *,
    num_replicas: int = 1,
    max_tokens_per_rank: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    oversize: Oversize = "error",
) -> PackingPlan:
    """Pack one epoch for all ranks; pure function of its arguments (see module doc).

    Exactly one of ``max_tokens_per_rank`` (token budget of one rank's micro-batch) and
    ``batch_size`` (mean examples per micro-batch, as a padded run would use) is given.
    """
    sizes_all = _as_lengths(lengths)
    _check_args(num_replicas, 0, max_tokens_per_rank, batch_size, oversize)
    n_all = sizes_all.size
    rng = np.random.default_rng([int(seed), int(epoch)])

    skipped = np.zeros(0, dtype=np.int64)
    candidates = np.arange(n_all, dtype=np.int64)
    if max_tokens_per_rank is not None:
        over = np.flatnonzero(sizes_all > max_tokens_per_rank)
        if over.size:
            shown = ", ".join(f"#{int(i)} ({int(sizes_all[i])} tokens)" for i in over[:5])
            more = f" and {over.size - 5} more" if over.size > 5 else ""
            if oversize == "error":
                raise PackingError(
                    f"{over.size} example(s) are longer than max_tokens_per_rank="
                    f"{max_tokens_per_rank}: {shown}{more}. Raise max_tokens_per_rank, "
                    "truncate examples (max_seq_length), or set oversize='report' to skip them"
                )
            message = (
                f"multipack: skipping {over.size} example(s) longer than max_tokens_per_rank="
                f"{max_tokens_per_rank}: {shown}{more}"
            )
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
            skipped = over
            keep = np.ones(n_all, dtype=bool)
            keep[over] = False
            candidates = candidates[keep]

    perm = candidates[rng.permutation(candidates.size)]
    order = perm[np.argsort(-sizes_all[perm], kind="stable")]
    sizes = sizes_all[order]
    n = sizes.size
    if n == 0:
        raise PackingError("multipack has no example to pack (empty dataset, or all skipped)")

    if max_tokens_per_rank is not None:
        num_bins, bin_of = _pack_to_budget(sizes, max_tokens_per_rank, num_replicas)
    else:
        num_bins = _round_up(-(-n // batch_size), num_replicas)
        bin_of = _fill(sizes, num_bins)[0]

    num_padding = 0
    if n < num_bins and not drop_last:
        # Fill the empty bins with repeats of the shortest examples (fewest extra tokens).
        empty = np.arange(n, num_bins, dtype=np.int64)
        reps = order[::-1][np.arange(empty.size) % n]
        order = np.concatenate([order, reps])
        bin_of = np.concatenate([bin_of, empty])
        num_padding = int(empty.size)
        logger.warning(
            "multipack: %d example(s) for %d micro-batches; repeating %d short example(s) so "
            "every rank gets a batch",
            n,
            num_bins,
            num_padding,
        )

    counts = np.bincount(bin_of, minlength=num_bins)
    by_bin = np.argsort(bin_of, kind="stable")
    indices = order[by_bin]
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    bin_tokens = np.bincount(bin_of, weights=sizes_all[order], minlength=num_bins).astype(np.int64)

    # Alike bins run in the same step; steps are then shuffled.
    ranked = np.argsort(-bin_tokens, kind="stable").reshape(-1, num_replicas)
    dropped = np.zeros(0, dtype=np.int64)
    if drop_last:
        has_empty = (counts[ranked] == 0).any(axis=1)
        if has_empty.any():
            lost_bins = ranked[has_empty].reshape(-1)
            dropped = np.concatenate(
                [indices[offsets[b] : offsets[b + 1]] for b in lost_bins]
                + [np.zeros(0, dtype=np.int64)]
            )
            ranked = ranked[~has_empty]
            logger.warning(
                "multipack: drop_last drops %d example(s): too few to give every rank a batch",
                dropped.size,
            )
    step_bins = ranked[rng.permutation(ranked.shape[0])]
    real = int(bin_tokens[step_bins].sum()) - int(sizes_all[order[n:]].sum())
    return PackingPlan(
        indices=indices,
        bin_offsets=offsets,
        bin_tokens=bin_tokens,
        step_bins=step_bins,
        capacity=max_tokens_per_rank,
        num_padding=num_padding,
        dropped=dropped,
        skipped=skipped,
        real_tokens=real,
    )


def _check_args(
    num_replicas: int,
    rank: int,
    max_tokens_per_rank: int | None,
    batch_size: int | None,
    oversize: str,
) -> None:
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be an int in [0, {num_replicas}), got {rank!r}")
    if (max_tokens_per_rank is None) == (batch_size is None):
        raise ValueError(
            "give exactly one of max_tokens_per_rank (token budget per rank per step) and "
            "batch_size (mean examples per micro-batch)"
        )
    for name, value in (("max_tokens_per_rank", max_tokens_per_rank), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if oversize not in ("error", "report"):
        raise ValueError(f"oversize must be 'error' or 'report', got {oversize!r}")


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill in world size / rank from torch.distributed when not given."""
    if num_replicas is not None and rank is not None:
        return num_replicas, rank
    import torch.distributed as dist

    live = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if live else 1
    if rank is None:
        rank = dist.get_rank() if live else 0
    return num_replicas, rank


class MultipackBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding, for this rank, one list of example indices per step.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=PaddingFreeCollator())``.
    Each rank builds the same plan from ``(lengths, seed, epoch)`` and takes its own column,
    so no communication is needed; the loader must not be sharded again (do not let
    ``accelerate`` split this loader's batches across processes).

    Args:
        lengths: tokens per example (see ``lengths.compute_lengths``).
        num_replicas, rank: data-parallel world size and this process's rank; default to
            those of the initialised ``torch.distributed`` process group, else 1 and 0.
        max_tokens_per_rank: token budget of one micro-batch on one rank. Or
        batch_size: mean number of examples per micro-batch (the number of steps then
            matches a padded run with that per-device batch size); exactly one is given.
        seed, epoch: the plan is a pure function of these; call :meth:`set_epoch` each epoch.
        drop_last: when there are fewer examples than micro-batches, drop the incomplete
            step instead of repeating short examples.
        oversize: ``"error"`` (default) raises naming examples longer than the budget;
            ``"report"`` skips them with a warning (see ``plan.skipped``).
        start_step: steps of ``epoch`` already consumed (resume); see :meth:`load_state_dict`.

    Resuming: :meth:`state_dict` records the epoch and the number of steps this sampler has
    yielded. A ``DataLoader`` with workers prefetches, so for an exact resume record the
    number of steps actually trained and pass it as ``{"epoch": e, "step": s}``; do not also
    let the trainer skip batches, or they are skipped twice.
    """

    def __init__(
        self,
        lengths: Any,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        max_tokens_per_rank: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        oversize: Oversize = "error",
        start_step: int = 0,
    ) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        _check_args(num_replicas, rank, max_tokens_per_rank, batch_size, oversize)
        self.lengths = _as_lengths(lengths)
        self.lengths.setflags(write=False)
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_tokens_per_rank = max_tokens_per_rank
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.drop_last = drop_last
        self.oversize = oversize
        self._plan: PackingPlan | None = None
        self._plan_epoch: int | None = None
        self._resume_step = 0
        self._step = 0
        self._set_resume(int(start_step))

    @classmethod
    def from_dataset(
        cls, dataset: Any, *, column: str = "input_ids", **kwargs: Any
    ) -> MultipackBatchSampler:
        """Build from a dataset, computing (and caching) lengths of ``column`` once."""
        from .lengths import compute_lengths

        return cls(compute_lengths(dataset, column), **kwargs)

    # -- plan ------------------------------------------------------------------------

    @property
    def plan(self) -> PackingPlan:
        """The packing of the current epoch (computed once per epoch)."""
        if self._plan is None or self._plan_epoch != self.epoch:
            self._plan = plan_epoch(
                self.lengths,
                num_replicas=self.num_replicas,
                max_tokens_per_rank=self.max_tokens_per_rank,
                batch_size=self.batch_size,
                seed=self.seed,
                epoch=self.epoch,
                drop_last=self.drop_last,
                oversize=self.oversize,
            )
            self._plan_epoch = self.epoch
        return self._plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch starts from its first step."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_step = 0
            self._step = 0

    def __len__(self) -> int:
        return self.plan.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        start = self._resume_step
        self._resume_step = 0
        self._step = start
        for step in range(start, plan.num_steps):
            self._step = step + 1
            yield plan.batch(step, self.rank)

    # -- resume ----------------------------------------------------------------------

    def _set_resume(self, step: int) -> None:
        if step < 0:
            raise ValueError(f"start step must be >= 0, got {step}")
        self._resume_step = step
        self._step = step

    def _digest(self) -> list[int]:
        return [int(self.lengths.size), int(self.lengths.sum())]

    def state_dict(self) -> dict[str, Any]:
        """Epoch and steps yielded so far in it, plus what the plan depends on."""
        return {
            "epoch": self.epoch,
            "step": self._step,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens_per_rank": self.max_tokens_per_rank,
            "batch_size": self.batch_size,
            "lengths_digest": self._digest(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next ``__iter__`` starts at ``state["step"]`` of ``state["epoch"]``.

        Only ``epoch`` and ``step`` are required; the other keys, when present, must match
        this sampler, since a different plan would repeat or skip examples."""
        for key in ("epoch", "step"):
            if key not in state:
                raise KeyError(f"multipack state needs {key!r}; got keys {sorted(state)}")
        checks = {
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "max_tokens_per_rank": self.max_tokens_per_rank,
            "batch_size": self.batch_size,
            "lengths_digest": self._digest(),
        }
        for key, mine in checks.items():
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume multipack: saved {key}={state[key]!r} but this sampler has "
                    f"{mine!r}; resuming with a different plan would repeat or skip examples"
                )
        self.epoch = int(state["epoch"])
        self._set_resume(int(state["step"]))

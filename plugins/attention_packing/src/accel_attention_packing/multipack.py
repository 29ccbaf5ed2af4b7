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
   ``C``, the smallest ``m`` for which longest-processing-time assignment provably keeps
   every bin within ``C``; with ``batch_size`` semantics, as many bins as a padded run
   with that per-device batch size would have steps;
3. longest-processing-time (LPT) assignment: each example, longest first, goes to the bin
   with the fewest tokens so far (a heap; ~0.6 s per million examples). Bins end within
   about one short example of each other;
4. sort bins by tokens and cut them into steps of ``num_replicas`` bins, so the bins that
   run together are the most alike; shuffle the order of steps.

With a budget, step 2 first tries the bin count that leaves each bin room for one shortest
example (what LPT needs in practice) and keeps it if every bin fits; otherwise it uses a
bound that is guaranteed to fit. Bound: when the j-th example (size s_j, with P_j tokens placed before it) is
placed, the emptiest bin holds at most P_j / m tokens, so no bin exceeds
``max_j (P_j / m + s_j)``; the first m examples open their own bins. Efficiency is then
``1 - (shortest example) / C`` minus rounding to whole steps, >99% for budgets of a few
thousand tokens.

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

from accel.errors import ConfigError

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


def _lpt(sizes: Sequence[int], num_bins: int) -> np.ndarray:
    """Longest-processing-time assignment of sizes (sorted, longest first) to num_bins."""
    n = len(sizes)
    first = min(n, num_bins)
    assign = list(range(first))
    if n > first:
        # heap of load * num_bins + bin: ints compare fast and ties go to the lowest bin id
        heap = [int(sizes[b]) * num_bins + b for b in range(first)]
        heapq.heapify(heap)
        replace = heapq.heapreplace
        append = assign.append
        for size in sizes[first:]:
            top = heap[0]
            append(top % num_bins)
            replace(heap, top + size * num_bins)
    return np.asarray(assign, dtype=np.int64)


def _pack_to_budget(
    sizes: np.ndarray, size_list: list[int], capacity: int, num_replicas: int
) -> tuple[int, np.ndarray]:
    """LPT packing within ``capacity`` with as few bins as practical.

    LPT bins usually end within one shortest example of their mean, so first try the bin
    count that leaves exactly that much room; if a bin overflows, fall back to the count
    from :func:`_bins_for_budget`, which is guaranteed to fit (but can be loose, e.g. for
    uniformly distributed lengths)."""
    safe = _bins_for_budget(sizes, capacity, num_replicas)
    room = capacity - int(sizes[-1])
    if room > 0:
        guess = max(num_replicas, _round_up(-(-int(sizes.sum()) // room), num_replicas))
        if guess < safe:
            bin_of = _lpt(size_list, guess)
            if np.bincount(bin_of, weights=sizes, minlength=guess).max() <= capacity:
                return guess, bin_of
    return safe, _lpt(size_list, safe)


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

    size_list = sizes.tolist()
    if max_tokens_per_rank is not None:
        num_bins, bin_of = _pack_to_budget(sizes, size_list, max_tokens_per_rank, num_replicas)
    else:
        num_bins = _round_up(-(-n // batch_size), num_replicas)
        bin_of = _lpt(size_list, num_bins)

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

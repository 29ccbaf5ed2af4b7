"""The training batches of online mixing: each example's dataset is drawn from the bandit.

Every rank runs the same sampler (same seed, same bandit, whose weights are kept identical by
reducing the rewards over ranks), draws the examples of the whole global batch
(``batch_size * num_replicas``) and yields its own slice, so no communication is needed for
the draws. Every ``sampling_interval`` examples a dataset is drawn with the bandit's
probabilities; the next examples come from it. Each dataset is read as a stream of shuffled
passes: when one runs out it is re-shuffled (a new permutation per pass) and restarts.

An epoch is ``ceil(total examples / global batch)`` batches, as many examples as the
datasets hold together. The sources of the examples of each yielded batch are queued in
``pending``, in order, for the loss that rewards them.

Resume: :meth:`state_dict` holds the draw RNG, the position and pass of every stream, the
counts and the position in the epoch. After :meth:`load_state_dict` the next ``__iter__``
first yields ``skip`` empty placeholders (transformers' trainer discards the batches it
already trained, without fetching them), then continues exactly where the saved run was.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .bandit import Exp3


class OdmBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        sizes: Sequence[int],
        bandit: Exp3,
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        sampling_interval: int = 1,
        track: bool = True,
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        if min(self.sizes) < 1:
            raise ValueError(f"every dataset needs at least one example, got sizes {self.sizes}")
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)
        self.bandit = bandit
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.sampling_interval = int(sampling_interval)
        self.track = track  # queue the sources of each batch for the loss that rewards them
        self.steps_per_epoch = math.ceil(sum(self.sizes) / (self.batch_size * self.num_replicas))
        self.rng = np.random.default_rng([self.seed, 11])
        k = len(self.sizes)
        self.position = [0] * k  # next row of the current pass, per dataset
        self.passes = [0] * k  # completed passes, per dataset
        self.counts = [0] * k  # examples drawn (all ranks), per dataset
        self.produced = 0
        self.arm = 0
        self.epoch = 0
        self.step = 0  # batches yielded in this epoch
        self.skip = 0
        self.pending: deque[list[int]] = deque()
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._cumulative: tuple[int, list[float]] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.step = 0
            self.skip = 0

    def _row(self, arm: int) -> int:
        cached = self._perms.get(arm)
        if cached is None or cached[0] != self.passes[arm]:
            perm = np.random.default_rng([self.seed, arm, self.passes[arm]]).permutation(
                self.sizes[arm]
            )
            cached = self._perms[arm] = (self.passes[arm], perm)
        row = int(cached[1][self.position[arm]])
        self.position[arm] += 1
        if self.position[arm] == self.sizes[arm]:
            self.position[arm] = 0
            self.passes[arm] += 1
        return row

    def draw(self) -> tuple[int, int]:
        """``(dataset, row)`` of the next example."""
        if self.produced % self.sampling_interval == 0:
            if self._cumulative is None or self._cumulative[0] != self.bandit.version:
                cum = np.cumsum(self.bandit.probabilities())
                self._cumulative = (self.bandit.version, (cum / cum[-1]).tolist())
            u = self.rng.random()
            self.arm = min(bisect.bisect_right(self._cumulative[1], u), len(self.sizes) - 1)
        self.produced += 1
        self.counts[self.arm] += 1
        return self.arm, self._row(self.arm)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            yield []
        while self.step < self.steps_per_epoch:
            batch = [self.draw() for _ in range(self.batch_size * self.num_replicas)]
            self.step += 1
            mine = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if self.track:
                self.pending.append([arm for arm, _ in mine])
            yield [int(self.offsets[arm]) + row for arm, row in mine]

    # -- resume --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "sampling_interval": self.sampling_interval,
            "rng": dict(self.rng.bit_generator.state),
            "position": list(self.position),
            "passes": list(self.passes),
            "counts": list(self.counts),
            "produced": self.produced,
            "arm": self.arm,
            "epoch": self.epoch,
            "step": self.step,
            "bandit": self.bandit.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, skip: bool = True) -> None:
        """Restore; ``skip``: the trainer will skip the batches of this epoch already trained
        (its default), so yield that many placeholders first."""
        for key in ("sizes", "seed", "batch_size", "num_replicas", "sampling_interval"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"saved {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resuming with other settings would change the mixing decisions"
                )
        self.rng.bit_generator.state = state["rng"]
        self.position = list(state["position"])
        self.passes = list(state["passes"])
        self.counts = list(state["counts"])
        self.produced = int(state["produced"])
        self.arm = int(state["arm"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.skip = self.step if skip and self.step < self.steps_per_epoch else 0
        self.bandit.load_state_dict(state["bandit"])
        self.pending.clear()
        self._perms.clear()
        self._cumulative = None

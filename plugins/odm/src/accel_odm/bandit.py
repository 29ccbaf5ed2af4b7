"""EXP3 over K datasets (arms), as fms-acceleration's online data mixing defines it.

Probabilities: ``p_i = (1 - gamma) * w_i / sum(w) + gamma / K``, so every arm keeps at least
``gamma / K``. Update, with ``r_i`` the mean reward of arm ``i`` over the interval and only
for arms observed in it: ``w_i <- w_i * exp(eta * (r_i / p_i) / K)`` (the importance-weighted
reward estimate of EXP3; arms not observed get estimate 0). Weights are kept as logarithms
so long runs never overflow; ``weights()`` returns them normalized to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class Exp3:
    def __init__(
        self, num_arms: int, gamma: float, eta: float, initial: Sequence[float] | None = None
    ) -> None:
        if num_arms < 1:
            raise ValueError(f"EXP3 needs at least one arm, got {num_arms}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        self.k = num_arms
        self.gamma = float(gamma)
        self.eta = float(eta)
        start = list(initial) if initial is not None else [1.0] * num_arms
        if len(start) != num_arms or min(start) < 0 or sum(start) <= 0:
            raise ValueError(f"initial weights must be {num_arms} values >= 0, not all 0")
        self.log_weights = [math.log(w) if w > 0 else -math.inf for w in start]
        self.version = 0  # changes whenever the weights do (lets samplers cache)

    def weights(self) -> list[float]:
        top = max(self.log_weights)
        raw = [math.exp(lw - top) for lw in self.log_weights]
        total = sum(raw)
        return [w / total for w in raw]

    def probabilities(self) -> list[float]:
        return [(1 - self.gamma) * w + self.gamma / self.k for w in self.weights()]

    def update(self, rewards: Sequence[float | None]) -> list[float | None]:
        """One EXP3 step; ``rewards[i]`` is arm i's mean reward, ``None`` if unobserved.
        Returns the reward estimates ``r_i / p_i`` used (``None`` for unobserved arms)."""
        if len(rewards) != self.k:
            raise ValueError(f"expected {self.k} rewards, got {len(rewards)}")
        probs = self.probabilities()
        estimates: list[float | None] = []
        for i, r in enumerate(rewards):
            if r is None or not math.isfinite(r):
                estimates.append(None)
                continue
            est = r / probs[i]
            self.log_weights[i] += self.eta * est / self.k
            estimates.append(est)
        self.version += 1
        return estimates

    def state_dict(self) -> dict[str, Any]:
        return {"log_weights": [lw if math.isfinite(lw) else None for lw in self.log_weights]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["log_weights"]
        if len(saved) != self.k:
            raise ValueError(f"saved bandit has {len(saved)} arms, this run {self.k}")
        self.log_weights = [-math.inf if lw is None else float(lw) for lw in saved]
        self.version += 1

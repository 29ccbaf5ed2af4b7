"""The rewards of online mixing, one record each: its name, what it reads, how it combines.

A reward reads one of two measurements, both per dataset:

- ``forward``: statistics of each training example from the training forward's own logits
  (``means[0]`` its mean token loss, ``means[1]`` the mean entropy of its predictions,
  ``means[2]`` the mean squared entropy), combined per example by ``per_example`` and
  averaged per dataset over the ``update_interval`` steps; the bandit updates every
  ``update_interval`` steps;
- ``validation``: each dataset's loss on its validation split (``eval_<dataset>_loss``),
  the bandit updates after each evaluation.

``signal`` turns the measured per-dataset values of one update into the bandit's rewards.
fms-acceleration's rewards pass them on as they are (``raw``): the bandit favours the
datasets whose loss (or entropy) is highest, which includes a dataset that cannot be learnt.
The learnability rewards pass on how fast each dataset's loss is still falling instead
(:class:`Decrease`): a dataset whose loss has flattened, learnable or not, earns nothing.

A new reward is one :class:`Reward` added to ``REWARDS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Values = list[float | None]


class Signal:
    """Turns one update's measured values per dataset into the bandit's rewards; may keep
    state across updates (saved in every checkpoint)."""

    def __call__(self, values: Values) -> Values:
        return list(values)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def raw(k: int) -> Signal:
    """fms-acceleration's semantics: the measured value is the reward."""
    del k
    return Signal()


class Decrease(Signal):
    """Learnability: how much each dataset's loss fell over the last ``window`` updates.

    Each update's value is folded into a per-dataset moving average (``smoothing`` is the
    weight of the new value; 1 keeps the value itself, for measurements on fixed examples
    such as a validation split). The reward of dataset ``i`` is ``(old_i - now_i)`` of that
    average, ``window`` updates apart, divided by the largest such absolute drop over the
    datasets, so rewards lie in [-1, 1] whatever the loss scale: the fastest-learning dataset
    earns 1, a flat one 0, one whose loss rises a negative reward. ``None`` (no update of that
    dataset) until a dataset has been seen ``window + 1`` times.
    """

    def __init__(self, k: int, window: int, smoothing: float) -> None:
        if window < 1 or not 0 < smoothing <= 1:
            raise ValueError(f"window >= 1 and smoothing in (0, 1], got {window}, {smoothing}")
        self.k, self.window, self.smoothing = k, window, smoothing
        self.average: Values = [None] * k
        self.past: list[list[float]] = [[] for _ in range(k)]  # the last window + 1 averages

    def __call__(self, values: Values) -> Values:
        if len(values) != self.k:
            raise ValueError(f"expected {self.k} values, got {len(values)}")
        for i, v in enumerate(values):
            if v is None or not math.isfinite(v):
                continue
            a = self.average[i]
            self.average[i] = v if a is None else a + self.smoothing * (v - a)
            self.past[i] = [*self.past[i], self.average[i]][-(self.window + 1) :]  # type: ignore[list-item]
        drops: Values = [
            (p[0] - p[-1]) if len(p) == self.window + 1 and values[i] is not None else None
            for i, p in enumerate(self.past)
        ]
        scale = max((abs(d) for d in drops if d is not None), default=0.0)
        if scale <= 0:
            return [None if d is None else 0.0 for d in drops]
        return [None if d is None else d / scale for d in drops]

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "past": self.past}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["past"]) != self.k:
            raise ValueError(f"saved signal has {len(state['past'])} datasets, this run {self.k}")
        self.average = list(state["average"])
        self.past = [list(p) for p in state["past"]]


def _loss(means: Any) -> Any:
    return means[0]


def _entropy(means: Any) -> Any:
    return means[1]


def _entropy3_varent1(means: Any) -> Any:
    """3 parts mean entropy, 1 part its variance over the example's positions."""
    return (3 * means[1] + (means[2] - means[1] ** 2).clamp(min=0)) / 4


@dataclass(frozen=True)
class Reward:
    name: str
    reads: str  # "forward" or "validation"
    help: str
    #: forward rewards: (3, examples) per-example means -> one value per example
    per_example: Callable[[Any], Any] | None = None
    #: the number of datasets -> the signal that turns measured values into rewards
    signal: Callable[[int], Signal] = raw
    #: forward rewards: the loss pass also computes the entropy statistics
    needs_entropy: bool = False
    aliases: tuple[str, ...] = field(default=())


REWARDS: tuple[Reward, ...] = (
    Reward(
        "train_loss",
        "forward",
        "each dataset's mean loss in the training forward (fms-acceleration's default)",
        per_example=_loss,
    ),
    Reward(
        "entropy",
        "forward",
        "the mean entropy of the model's predictions on each dataset, training forward",
        per_example=_entropy,
        needs_entropy=True,
    ),
    Reward(
        "entropy3_varent1",
        "forward",
        "(3 x mean + variance of the prediction entropy) / 4, training forward",
        per_example=_entropy3_varent1,
        needs_entropy=True,
        aliases=("entropy_varentropy",),
    ),
    Reward(
        "validation_loss",
        "validation",
        "each dataset's loss on its validation split, at every evaluation",
    ),
    Reward(
        "train_loss_decrease",
        "forward",
        "learnability: how much each dataset's training loss (moving average) fell over the "
        "last 20 updates, relative to the fastest-falling dataset",
        per_example=_loss,
        signal=lambda k: Decrease(k, window=20, smoothing=0.1),
    ),
    Reward(
        "validation_loss_decrease",
        "validation",
        "learnability: how much each dataset's validation loss fell since the previous "
        "evaluation, relative to the fastest-falling dataset",
        signal=lambda k: Decrease(k, window=1, smoothing=1.0),
    ),
)

BY_NAME: dict[str, Reward] = {r.name: r for r in REWARDS}
ALIASES: dict[str, str] = {a: r.name for r in REWARDS for a in r.aliases}
#: fms-acceleration's other rewards, refused by name with the reason
NOT_IMPLEMENTED = {
    "gradnorm": "a step's gradient norm mixes every dataset of the batch",
    "entropy_last_token": "not implemented",
    "learnability": "not implemented (needs a second, templated evaluation); "
    "train_loss_decrease and validation_loss_decrease measure learnability from the loss",
    "combined": "not implemented (needs a second, templated evaluation)",
}


def names(reads: str | None = None) -> list[str]:
    """The rewards' names (those that read ``reads`` only, when given)."""
    return [r.name for r in REWARDS if reads is None or r.reads == reads]


def lookup(name: str) -> Reward:
    """The record of ``name`` (case-insensitive, aliases accepted); ValueError naming the
    valid rewards otherwise."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key in NOT_IMPLEMENTED:
        raise ValueError(
            f"reward_type '{key}' is not supported ({NOT_IMPLEMENTED[key]}); "
            f"supported: {', '.join(names())}"
        )
    if key not in BY_NAME:
        raise ValueError(f"reward_type '{key}' is not one of {', '.join(names())}")
    return BY_NAME[key]


def help_text() -> str:
    return "; ".join(f"{r.name} ({r.help})" for r in REWARDS)

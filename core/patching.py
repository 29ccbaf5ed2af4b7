"""Declarative model patching: rules, a per-model report, and revert.

A plugin returns :class:`PatchRule` objects; :func:`apply_patches` walks the model once,
applies every rule to the modules it matches, counts them, and returns an
:class:`AppliedPatches` that can print the report and undo everything. A feature whose
rules matched nothing is an error: the user asked for it, so a silent no-op would lie.

Patches live on module instances (an instance ``forward``, a swapped child module, or an
instance attribute such as ``loss_function``), so two models — and two frameworks — in one
process do not see each other's patches.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PatchError

Revert = Callable[[], None]


@dataclass(frozen=True)
class PatchRule:
    """One patch: which modules it matches and what it does to each.

    Matching: a module matches when its class name is in ``module_classes`` (or that tuple
    is empty), ``match(module)`` is true (when given), and the model's ``config.model_type``
    is in ``model_types`` (when given). Exactly one action is set:

    - ``forward(module)`` returns the new forward callable for that module instance;
    - ``replace(module)`` returns a module put in its place;
    - ``apply(module)`` patches it any other way and returns a revert callable (or ``None``
      when it decided not to patch that module).
    """

    name: str
    feature: str
    module_classes: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    match: Callable[[Any], bool] | None = None
    forward: Callable[[Any], Callable[..., Any]] | None = None
    replace: Callable[[Any], Any] | None = None
    apply: Callable[[Any], Revert | None] | None = None

    def __post_init__(self) -> None:
        actions = [a for a in (self.forward, self.replace, self.apply) if a is not None]
        if len(actions) != 1:
            raise ValueError(f"patch rule {self.name!r} needs exactly one of forward/replace/apply")

    def matches(self, module: Any, model_type: str | None) -> bool:
        if self.model_types and model_type not in self.model_types:
            return False
        if self.module_classes and type(module).__name__ not in self.module_classes:
            return False
        return self.match is None or bool(self.match(module))


@dataclass
class AppliedPatches:
    """What :func:`apply_patches` did to one model: counts per rule, and how to undo it."""

    model_class: str
    model_type: str | None
    counts: dict[str, int] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    _reverts: list[Revert] = field(default_factory=list, repr=False)

    def lines(self) -> list[str]:
        if not self.counts:
            return ["(no patches)"]
        width = max(len(name) for name in self.counts)
        return [
            f"{name:<{width}} -> {count} module(s)  [{self.features[name]}]"
            for name, count in self.counts.items()
        ]

    def revert(self) -> None:
        """Undo every patch, newest first."""
        while self._reverts:
            self._reverts.pop()()

    def merge(self, other: AppliedPatches) -> None:
        self.counts.update(other.counts)
        self.features.update(other.features)
        self._reverts.extend(other._reverts)
        other._reverts = []


def _set_forward(module: Any, new_forward: Callable[..., Any]) -> Revert:
    had_own = "forward" in vars(module)
    previous = vars(module).get("forward")
    module.forward = new_forward

    def revert() -> None:
        if had_own:
            module.forward = previous
        else:
            del module.forward

    return revert


def _replace_child(parent: Any, name: str, new: Any) -> Revert:
    old = parent._modules[name]
    parent._modules[name] = new

    def revert() -> None:
        parent._modules[name] = old

    return revert


def model_type_of(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def apply_patches(model: Any, rules: Iterable[PatchRule]) -> AppliedPatches:
    """Apply ``rules`` to ``model`` and return the report.

    Raises :class:`PatchError` naming the model and the feature when all the rules of a
    feature matched nothing (everything applied so far is reverted first).
    """
    rules = list(rules)
    model_type = model_type_of(model)
    applied = AppliedPatches(type(model).__name__, model_type)
    try:
        _apply_all(model, rules, model_type, applied)
    except BaseException:
        applied.revert()  # never leave a model half-patched
        raise
    _check_features(applied, rules)
    return applied


def _apply_all(
    model: Any, rules: list[PatchRule], model_type: str | None, applied: AppliedPatches
) -> None:
    modules = list(model.named_modules())
    parents = {
        id(m): (parent, child)
        for _, parent in modules
        for child, m in parent._modules.items()
        if m is not None
    }
    for rule in rules:
        applied.features[rule.name] = rule.feature
        count = 0
        for _, module in modules:
            if not rule.matches(module, model_type):
                continue
            if rule.forward is not None:
                applied._reverts.append(_set_forward(module, rule.forward(module)))
            elif rule.replace is not None:
                if id(module) not in parents:
                    raise PatchError(f"patch rule {rule.name!r} cannot replace the root model")
                parent, child = parents[id(module)]
                applied._reverts.append(_replace_child(parent, child, rule.replace(module)))
            else:
                revert = rule.apply(module)
                if revert is None:
                    continue
                applied._reverts.append(revert)
            count += 1
        applied.counts[rule.name] = count


def _check_features(applied: AppliedPatches, rules: Sequence[PatchRule]) -> None:
    totals: dict[str, int] = {}
    for rule in rules:
        totals[rule.feature] = totals.get(rule.feature, 0) + applied.counts[rule.name]
    empty = [feature for feature, total in totals.items() if total == 0]
    if empty:
        applied.revert()
        names = ", ".join(r.name for r in rules if r.feature in empty)
        raise PatchError(
            f"feature {', '.join(repr(f) for f in empty)} patched nothing in "
            f"{applied.model_class} (model_type {applied.model_type!r}): rule(s) {names} matched "
            "no module. This model is not supported by that feature; switch it off or use a "
            "supported architecture (`accel plugins` lists what each plugin supports)."
        )


def set_attribute(obj: Any, name: str, value: Any) -> Revert:
    """Set an instance attribute and return how to restore it (for ``PatchRule.apply``)."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)

    def revert() -> None:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)

    return revert


def bind(function: Callable[..., Any], module: Any) -> Callable[..., Any]:
    """Bind ``function(module, ...)`` to ``module`` so it can serve as its forward."""
    return types.MethodType(function, module)

"""Declarative model patching: rules, a per-model report, and revert.

A plugin returns :class:`PatchRule` objects; the framework collects the rules of every active
plugin (in the resolved plugin order) and :func:`apply_patches` applies them to the model as
one transaction: it counts the modules each rule patched and returns an
:class:`AppliedPatches` that prints the report and undoes everything; on any failure
everything already applied is undone first. A feature whose rules matched nothing is an
error: the user asked for it, so a silent no-op would lie.

Patches live on module instances (an instance ``forward``, a swapped child module, or an
instance attribute such as ``loss_function``), so two models — and two frameworks — in one
process do not see each other's patches.

Two rules on one module compose as follows (see :class:`PatchRule` for the actions):

- ``forward`` supplies the module's forward: at most one rule may do that per module, and a
  second is an error naming both rules (the first would be reported as applied but never
  run);
- ``replace`` swaps the module out: no other ``forward``/``replace``/``apply`` rule may touch
  that module (it would patch a module that is no longer in the model);
- ``wrap`` rules are applied after every other rule, on the modules the model then has, in
  rule order (the resolved plugin order, then each plugin's own order): each receives the
  forward the module has at that point — another rule's ``forward`` or an earlier wrap — so
  all of them run, later rules outermost;
- ``apply`` rules run in order with ``forward`` and ``replace`` rules; they patch anything
  else and are responsible for reading the state they change (e.g. the module's current
  ``forward``).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import AccelError, PatchError
from .helpers import add_note

Revert = Callable[[], None]


@dataclass(frozen=True)
class PatchRule:
    """One patch: which modules it matches and what it does to each.

    Matching: a module matches when its class name is in ``module_classes`` (or that tuple
    is empty), the model's ``config.model_type`` is in ``model_types`` (when given), and
    ``match(module)`` is true (when given; it receives the module instance and is called
    only on modules that passed the other two tests). The model itself (the root module,
    a ``PeftModel`` under LoRA) is matched like every other module. Exactly one action:

    - ``forward(module)`` returns the forward that replaces the module's own (one rule per
      module at most);
    - ``wrap(module, forward)`` returns a forward that wraps ``forward``, the one the module
      has once every non-wrap rule is applied; it should call it;
    - ``replace(module)`` returns a module put in its place (in its parent);
    - ``apply(module)`` patches it any other way and returns a revert callable (or ``None``
      when it decided not to patch that module, which is then not counted).
    """

    name: str
    feature: str
    module_classes: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    match: Callable[[Any], bool] | None = None
    forward: Callable[[Any], Callable[..., Any]] | None = None
    wrap: Callable[[Any, Callable[..., Any]], Callable[..., Any]] | None = None
    replace: Callable[[Any], Any] | None = None
    apply: Callable[[Any], Revert | None] | None = None

    def __post_init__(self) -> None:
        actions = [a for a in (self.forward, self.wrap, self.replace, self.apply) if a is not None]
        if len(actions) != 1:
            raise ValueError(
                f"patch rule {self.name!r} needs exactly one of forward/wrap/replace/apply"
            )

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
    """Apply ``rules`` to ``model`` as one transaction and return the report.

    Raises :class:`PatchError` naming the model and the feature when all the rules of a
    feature matched nothing, and naming both rules when two of them conflict on one module;
    on any error, everything applied so far is reverted first.
    """
    rules = list(rules)
    model_type = model_type_of(model)
    applied = AppliedPatches(type(model).__name__, model_type)
    for rule in rules:
        applied.features[rule.name] = rule.feature
        applied.counts[rule.name] = 0
    try:
        _apply_direct(model, [r for r in rules if r.wrap is None], model_type, applied)
        _apply_wraps(model, [r for r in rules if r.wrap is not None], model_type, applied)
        _check_features(applied, rules, model)
    except BaseException:
        applied.revert()  # never leave a model half-patched
        raise
    return applied


def _describe(path: str, module: Any) -> str:
    return f"'{path}' ({type(module).__name__})" if path else f"the model ({type(module).__name__})"


def _run(rule: PatchRule, path: str, action: Callable[..., Any], *args: Any) -> Any:
    """Call one of a rule's callables on ``args[0]`` (the module); its errors name both."""
    module = args[0]
    try:
        return action(*args)
    except AccelError as err:
        err.args = (f"patch rule '{rule.name}' on {_describe(path, module)}: {err}",)
        raise
    except Exception as err:
        add_note(err, f"accel: raised by patch rule '{rule.name}' on {_describe(path, module)}")
        raise


def _apply_direct(
    model: Any, rules: list[PatchRule], model_type: str | None, applied: AppliedPatches
) -> None:
    """The forward/replace/apply rules, in order, on the modules the model has now."""
    modules = list(model.named_modules())
    parents = {
        id(m): (parent, child)
        for _, parent in modules
        for child, m in parent._modules.items()
        if m is not None
    }
    original = {id(m): vars(m).get("forward") for _, m in modules}  # instance forwards
    forward_by: dict[int, str] = {}  # module -> the rule that supplied its forward
    replaced_by: dict[int, str] = {}  # module -> the rule that swapped it out
    touched_by: dict[int, str] = {}  # module -> the first rule that patched it
    for rule in rules:
        for path, module in modules:
            if not _run(rule, path, rule.matches, module, model_type):
                continue
            key = id(module)
            where = _describe(path, module)
            if key in replaced_by or (rule.replace is not None and key in touched_by):
                first = replaced_by.get(key) or touched_by[key]
                raise PatchError(
                    f"patch rules '{first}' and '{rule.name}' both patch {where}, and one of "
                    "them replaces the module, so the other would patch a module no longer in "
                    "the model; switch one of the two features off"
                )
            if rule.forward is not None:
                if vars(module).get("forward") is not original[key]:  # an earlier rule set it
                    first = forward_by[key]
                    raise PatchError(
                        f"patch rules '{first}' and '{rule.name}' both replace the "
                        f"forward of {where}; only one rule may supply a module's forward. A "
                        "rule that adds behaviour around the forward should use wrap= (it then "
                        "runs around the other one); otherwise switch one of the features off"
                    )
                new = _run(rule, path, rule.forward, module)
                applied._reverts.append(_set_forward(module, new))
                forward_by[key] = rule.name
            elif rule.replace is not None:
                if key not in parents:
                    raise PatchError(f"patch rule {rule.name!r} cannot replace the root model")
                parent, child = parents[key]
                new = _run(rule, path, rule.replace, module)
                applied._reverts.append(_replace_child(parent, child, new))
                replaced_by[key] = rule.name
            else:
                revert = _run(rule, path, rule.apply, module)
                if revert is None:
                    continue
                applied._reverts.append(revert)
            touched_by.setdefault(key, rule.name)
            applied.counts[rule.name] += 1
        if rule.apply is not None:  # note the forwards it set, on any module
            for _, module in modules:
                changed = vars(module).get("forward") is not original[id(module)]
                if changed and id(module) not in forward_by:
                    forward_by[id(module)] = rule.name


def _apply_wraps(
    model: Any, rules: list[PatchRule], model_type: str | None, applied: AppliedPatches
) -> None:
    """The wrap rules, in order, around whatever forward each module has by now."""
    modules = list(model.named_modules())
    for rule in rules:
        for path, module in modules:
            if not _run(rule, path, rule.matches, module, model_type):
                continue
            new = _run(rule, path, rule.wrap, module, module.forward)
            applied._reverts.append(_set_forward(module, new))
            applied.counts[rule.name] += 1


def _check_features(applied: AppliedPatches, rules: Sequence[PatchRule], model: Any) -> None:
    totals: dict[str, int] = {}
    for rule in rules:
        totals[rule.feature] = totals.get(rule.feature, 0) + applied.counts[rule.name]
    empty = [feature for feature, total in totals.items() if total == 0]
    if empty:
        names = ", ".join(r.name for r in rules if r.feature in empty)
        raise PatchError(
            f"feature {', '.join(repr(f) for f in empty)} patched nothing in "
            f"{applied.model_class} (model_type {applied.model_type!r}): rule(s) {names} matched "
            f"no module.{_classes_looked_for([r for r in rules if r.feature in empty], model)} "
            "This model is not supported by that feature; switch it off or use a "
            "supported architecture (`accel plugins` lists what each plugin supports)."
        )


def _classes_looked_for(rules: Sequence[PatchRule], model: Any) -> str:
    """The module classes the empty rules looked for, and the model's closest (a misspelt
    ``module_classes`` entry, e.g. ``LlamaMlp``, shows up beside ``LlamaMLP``)."""
    wanted = sorted({c for r in rules for c in r.module_classes})
    if not wanted:
        return ""
    present = sorted({type(m).__name__ for _, m in model.named_modules()})
    close = sorted(
        {c for w in wanted for c in difflib.get_close_matches(w, present, n=2, cutoff=0.6)}
    )
    text = f" It looked for module class(es) {', '.join(wanted)}"
    if close:
        text += f"; this model has {', '.join(close)}"
    return text + "."


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

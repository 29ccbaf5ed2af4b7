"""One record per feature: its config fields, when it is on, its rules, rule names, report.

Everything that names a feature reads :data:`FEATURES` (rules, the plugin's report, the README
table, the tests); the per-architecture support of each feature is the table in
:mod:`accel_fused_ops.support`. The tuple's order is the order the rules are applied in:
``fused_lora`` first, so the loss rule's lm_head wrapper calls the fused LoRA forward of a
LoRA-adapted lm_head. Builders live in the integration layer and are imported only when rules
are built (``accel plugins`` loads the plugin without torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .support import FEATURE_NAMES

if TYPE_CHECKING:
    from accel.api import PatchRule

    from .config import FusedOpsConfig


@dataclass(frozen=True)
class Feature:
    """A config switch of the plugin and the patch rules it builds."""

    #: the config field that switches it on (also the name in reports and errors)
    name: str
    #: every config field the feature reads
    fields: tuple[str, ...]
    #: what is replaced, in a few words (README table)
    patches: str
    #: the names of the rules its builder may return (reports show them prefixed ``fused_ops.``)
    rule_names: tuple[str, ...]
    #: whether ``settings`` switch it on
    enabled: Callable[[FusedOpsConfig], bool]
    #: ``"module:function"`` under ``accel_fused_ops.integration``; the function takes
    #: ``(settings, model)`` and returns the rules, checked against the model
    builder: str
    #: extra lines for the start-of-training report when it is on
    report: Callable[[FusedOpsConfig], list[str]] = lambda settings: []

    def build(self, settings: FusedOpsConfig, model: Any) -> list[PatchRule]:
        module, function = self.builder.split(":")
        build = getattr(importlib.import_module(f"accel_fused_ops.integration.{module}"), function)
        rules = build(settings, model)
        unknown = {r.name for r in rules} - set(self.rule_names)
        if unknown or any(r.feature != self.name for r in rules):
            raise RuntimeError(f"{self.name}: builder returned undeclared rules {sorted(unknown)}")
        return rules


_ROPE_NOTE = (
    "rope: apply_rotary_pos_emb is replaced in the modeling file, so every model of that "
    "architecture in this process uses it until the patch is reverted"
)


def _loss_options(settings: FusedOpsConfig) -> str:
    """The loss options that differ from their defaults, for the report line."""
    shown = [
        f"{name} {getattr(settings, name)}"
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0))
        if getattr(settings, name, default) != default
    ]
    if getattr(settings, "token_accuracy", False):
        shown.append("token_accuracy")
    budget = getattr(settings, "loss_memory_budget_mib", None)
    if budget is not None:
        shown.append(f"chunk budget {budget} MiB")
    return f" ({', '.join(shown)})" if shown else ""


FEATURES: tuple[Feature, ...] = (
    Feature(
        name="fused_lora",
        fields=("fused_lora", "base_layer"),
        patches="`forward` of every PEFT LoRA linear layer",
        rule_names=("lora_linear",),
        enabled=lambda s: bool(s.fused_lora),
        builder="lora:rules",
    ),
    Feature(
        name="fast_rms_layernorm",
        fields=("fast_rms_layernorm",),
        patches="`forward` of every RMSNorm module",
        rule_names=("rms_norm",),
        enabled=lambda s: bool(s.fast_rms_layernorm),
        builder="norms:rules",
    ),
    Feature(
        name="fast_swiglu",
        fields=("fast_swiglu",),
        patches="`forward` of every gated MLP (`down(act(gate(x)) * up(x))`, separate or fused "
        "gate/up projections)",
        rule_names=("gated_mlp",),
        enabled=lambda s: bool(s.fast_swiglu),
        builder="mlp:rules",
    ),
    Feature(
        name="fast_rope_embeddings",
        fields=("fast_rope_embeddings",),
        patches="`apply_rotary_pos_emb` of the attention modules' modeling file",
        rule_names=("rotary_embedding",),
        enabled=lambda s: bool(s.fast_rope_embeddings),
        builder="rope:rules",
        report=lambda s: [_ROPE_NOTE],
    ),
    Feature(
        name="fast_loss",
        fields=(
            "fast_loss",
            "label_smoothing",
            "z_loss",
            "token_accuracy",
            "loss_memory_budget_mib",
        ),
        patches="the model's `loss_function` (cross-entropy or fused linear cross-entropy)",
        # cross_entropy mode builds the first, fused_linear the second
        rule_names=("cross_entropy_loss", "linear_cross_entropy_loss"),
        enabled=lambda s: s.loss_mode is not None,
        builder="heads:rules",
        report=lambda s: [f"loss: {s.loss_mode}{_loss_options(s)}"],
    ),
)

FEATURE_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
assert tuple(FEATURE_BY_NAME) == FEATURE_NAMES, "features and the support table disagree"


def requested(settings: FusedOpsConfig) -> list[Feature]:
    """The features switched on in ``settings``, in application order."""
    return [f for f in FEATURES if f.enabled(settings)]

"""One record per feature: its config fields (type, default, help), its slot in a
command-line flag, when it is on, its rules, its report lines, and the architectures a
model-level test verified it on.

Everything that names a feature reads :data:`FEATURES`: the config schema itself
(:mod:`accel_fused_ops.config` assembles its dataclass from the records' fields), its checks,
the plugin's flags and report, the support table (:mod:`accel_fused_ops.support`: a feature
is Supported only on the architectures of its ``verified_on``), the README tables, the tests.
A new feature is its kernel, its integration builder and one record here. The tuple's order is the order
the rules are applied in:
``fused_lora`` first, so the loss rule's lm_head wrapper calls the fused LoRA forward of a
LoRA-adapted lm_head. Builders live in the integration layer and are imported only when rules
are built (``accel plugins`` loads the plugin without torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from accel.api import PatchRule

    from .config import FusedOpsConfig


FastLoss = Literal["cross_entropy", "fused_linear", "fused_ce_liger"]
BaseLayer = Literal["auto_gptq", "bitsandbytes", "plain"]


@dataclass(frozen=True)
class Option:
    """One field of the config schema: its name, type, default and the help text the
    configuration reference shows."""

    name: str
    type: Any
    default: Any
    help: str


def _switch(name: str, help: str) -> Option:
    return Option(name, bool, False, help)


@dataclass(frozen=True)
class Feature:
    """A config switch of the plugin and the patch rules it builds."""

    #: the config field that switches it on (its name is the feature's name in reports and
    #: errors)
    switch: Option
    #: the command-line flag (a key of :data:`FLAGS`) that sets it, and the position of its
    #: first value among the flag's values
    flag: str
    slot: int
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
    #: the other config fields only this feature reads (setting one while the feature is off
    #: is refused when ``options_need_it``)
    options: tuple[Option, ...] = ()
    options_need_it: bool = True
    #: the flag's values for this feature, in order (default: the switch alone)
    flag_fields: tuple[str, ...] = ()
    #: the model types a model-level test (``tests/test_models.py``) trains with the feature
    #: on and off and finds the same losses; ``EVERY`` = every architecture of the support
    #: table that does not mark the feature Unsupported with a reason. Elsewhere the feature
    #: is Unsupported ("not verified"): a new record starts verified nowhere.
    verified_on: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.switch.name

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    @property
    def schema(self) -> tuple[Option, ...]:
        """The config fields the feature owns, in the schema's order: its flag's values
        first, then its other options."""
        own = {o.name: o for o in (self.switch, *self.options)}
        return tuple(own[n] for n in self.values) + tuple(
            o for o in self.options if o.name not in self.values
        )

    @property
    def fields(self) -> tuple[str, ...]:
        """Every config field the feature reads."""
        return tuple(o.name for o in self.schema)

    @property
    def values(self) -> tuple[str, ...]:
        """The config fields its flag values set, in order."""
        return self.flag_fields or (self.name,)

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


#: ``verified_on`` value: every architecture of the table without an Unsupported reason
EVERY = ("*",)
TRAINING_PATH = "training.fused_ops_and_kernels"
PEFT_PATH = "peft.quantization.fused_ops_and_kernels"


@dataclass(frozen=True)
class FlagSpec:
    """A command-line flag (fms-hf-tuning's) whose values are the features' fields."""

    path: str
    help: str
    nargs: tuple[int, ...] | None = None


#: the flags in the order the tables show their features
FLAGS: dict[str, FlagSpec] = {
    "fast_kernels": FlagSpec(
        TRAINING_PATH,
        "fused loss, RMSNorm and RoPE kernels on/off (4th value: SwiGLU), e.g. True True True",
        nargs=(3, 4),
    ),
    "fused_lora": FlagSpec(
        PEFT_PATH, "base_layer (auto_gptq|bitsandbytes|plain) and True, e.g. auto_gptq True"
    ),
}

FEATURES: tuple[Feature, ...] = (
    Feature(
        switch=_switch("fused_lora", "base matmul + LoRA update in one autograd function"),
        flag="fused_lora",
        slot=0,
        flag_fields=("base_layer", "fused_lora"),
        options=(
            Option(
                "base_layer",
                BaseLayer | None,
                None,
                "what LoRA adapters sit on: auto_gptq (gptqmodel), bitsandbytes (4-bit) or "
                "plain; must match the model",
            ),
        ),
        options_need_it=False,  # fms-hf-tuning's --fused_lora auto_gptq False is accepted
        verified_on=EVERY,
        patches="`forward` of every PEFT LoRA linear layer",
        rule_names=("lora_linear",),
        enabled=lambda s: bool(s.fused_lora),
        builder="lora:rules",
    ),
    Feature(
        switch=_switch("fast_rms_layernorm", "RMSNorm kernel"),
        flag="fast_kernels",
        slot=1,
        verified_on=EVERY,
        patches="`forward` of every RMSNorm module",
        rule_names=("rms_norm",),
        enabled=lambda s: bool(s.fast_rms_layernorm),
        builder="norms:rules",
    ),
    Feature(
        switch=_switch(
            "fast_swiglu", "SwiGLU/GeGLU kernel in gated MLPs (4th --fast_kernels value)"
        ),
        flag="fast_kernels",
        slot=3,
        verified_on=EVERY,
        patches="`forward` of every gated MLP (`down(act(gate(x)) * up(x))`, separate or fused "
        "gate/up projections)",
        rule_names=("gated_mlp",),
        enabled=lambda s: bool(s.fast_swiglu),
        builder="mlp:rules",
    ),
    Feature(
        switch=_switch("fast_rope_embeddings", "RoPE kernel"),
        flag="fast_kernels",
        slot=2,
        verified_on=EVERY,
        patches="`apply_rotary_pos_emb` of the attention modules' modeling file",
        rule_names=("rotary_embedding",),
        enabled=lambda s: bool(s.fast_rope_embeddings),
        builder="rope:rules",
        report=lambda s: [_ROPE_NOTE],
    ),
    Feature(
        switch=Option(
            "fast_loss",
            bool | FastLoss,
            False,
            "true = fused linear cross-entropy (training never builds the logits); "
            "'cross_entropy' keeps the logits and uses the cross-entropy kernel; "
            "'fused_ce_liger' = 'fused_linear'",
        ),
        flag="fast_kernels",
        slot=0,
        options=(
            Option(
                "label_smoothing",
                float,
                0.0,
                "label smoothing computed inside the fused loss (as torch's); "
                "--label_smoothing_factor sets it when the fused loss is on",
            ),
            Option(
                "z_loss",
                float,
                0.0,
                "z-loss scale: adds z_loss * logsumexp(logits)^2 per token to the fused loss "
                "and logs the term as z_loss",
            ),
            Option(
                "token_accuracy",
                bool,
                False,
                "log token_accuracy (share of label tokens that are the argmax), computed "
                "in the fused loss pass without the logits",
            ),
            Option(
                "loss_memory_budget_mib",
                int | None,
                None,
                "MiB one chunk of the fused linear loss's logits may take; default: the "
                "rows the matmuls need for full speed, at most 256 MiB (CPU) / 64 MiB (CUDA); "
                "a frozen lm_head on CPU streams 32 MiB vocabulary blocks instead",
            ),
        ),
        verified_on=EVERY,
        patches="the model's `loss_function` (cross-entropy or fused linear cross-entropy)",
        # cross_entropy mode builds the first, fused_linear the second
        rule_names=("cross_entropy_loss", "linear_cross_entropy_loss"),
        enabled=lambda s: s.loss_mode is not None,
        builder="heads:rules",
        report=lambda s: [f"loss: {s.loss_mode}{_loss_options(s)}"],
    ),
)

FEATURE_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
#: the features in the order users set them (flag by flag, value by value): table columns
COLUMNS: tuple[str, ...] = tuple(
    f.name for f in sorted(FEATURES, key=lambda f: (list(FLAGS).index(f.flag), f.slot))
)


def flag_fields(flag: str) -> tuple[str, ...]:
    """The config fields ``flag``'s values set, in order, from the records."""
    mine = sorted((f for f in FEATURES if f.flag == flag), key=lambda f: f.slot)
    return tuple(name for f in mine for name in f.values)


#: every config field, feature by feature in table order (the schema's field order)
SCHEMA: tuple[Option, ...] = tuple(
    option for name in COLUMNS for option in FEATURE_BY_NAME[name].schema
)


def requested(settings: FusedOpsConfig) -> list[Feature]:
    """The features switched on in ``settings``, in application order."""
    return [f for f in FEATURES if f.enabled(settings)]

"""The patch rules of the fused_ops plugin: one or more per requested feature.

:func:`build_rules` checks everything it can *before* returning rules (architecture support,
module classes whose forward changed in this transformers version, LoRA layers that cannot be
fused), so a refused request raises :class:`accel.PatchError` with nothing patched. The core
applies the rules in order, counts the modules each one patched, and raises when a requested
feature patched nothing. Order matters once: ``fused_lora`` comes first, so the loss rule's
lm_head wrapper calls the fused LoRA forward of a LoRA-adapted lm_head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from accel import PatchError, PatchRule
from accel.patching import bind, model_type_of

from .config import FusedOpsConfig
from .support import CAUSAL_LM_HEADS, FEATURES, GATED_MLP_CLASSES

#: the order features are applied in (fused_lora first, the loss last: see module docstring)
FEATURE_ORDER = (
    "fused_lora",
    "fast_rms_layernorm",
    "fast_swiglu",
    "fast_rope_embeddings",
    "fast_loss",
)

#: the rule names each feature's builder returns (the patch report shows them prefixed with
#: ``fused_ops.``); fast_loss uses the first in ``cross_entropy`` mode, the second otherwise
RULE_NAMES = {
    "fused_lora": ("lora_linear",),
    "fast_rms_layernorm": ("rms_norm",),
    "fast_swiglu": ("gated_mlp",),
    "fast_rope_embeddings": ("rotary_embedding",),
    "fast_loss": ("cross_entropy_loss", "linear_cross_entropy_loss"),
}


def requested_features(settings: FusedOpsConfig) -> list[str]:
    """The features switched on in ``settings``, in application order."""
    on = {
        "fused_lora": bool(settings.fused_lora),
        "fast_rms_layernorm": bool(settings.fast_rms_layernorm),
        "fast_swiglu": bool(settings.fast_swiglu),
        "fast_rope_embeddings": bool(settings.fast_rope_embeddings),
        "fast_loss": settings.loss_mode is not None,
    }
    return [f for f in FEATURE_ORDER if on[f]]


def model_name(model: Any) -> str:
    """The class of the transformers model, looking through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__


def check_supported(feature: str, model: Any) -> None:
    """Raise PatchError when ``feature`` does not support the model's architecture."""
    spec = FEATURES[feature]
    model_type = model_type_of(model)
    if model_type in spec.model_types:
        return
    why = spec.excluded.get(model_type, "this architecture has not been verified with it")
    raise PatchError(
        f"{feature} cannot patch {model_name(model)} (model_type {model_type!r}): {why}. "
        f"Supported model types: {', '.join(spec.model_types)}. Switch {feature} off for "
        "this model."
    )


# ------------------------------------------------------------------------- one builder each


def _rms_norm_rules(model: Any) -> list[PatchRule]:
    from .forwards import rms_norm_forward
    from .kernels.rms_norm import rms_norm_params

    def is_rms_norm(module: Any) -> bool:
        return type(module).__name__.endswith("RMSNorm")

    for name, module in model.named_modules():
        if is_rms_norm(module):
            try:
                rms_norm_params(module)
            except ValueError as err:
                raise PatchError(f"fast_rms_layernorm: module '{name}': {err}") from None
    return [
        PatchRule(
            name=RULE_NAMES["fast_rms_layernorm"][0],
            feature="fast_rms_layernorm",
            model_types=FEATURES["fast_rms_layernorm"].model_types,
            match=is_rms_norm,
            forward=rms_norm_forward,
        )
    ]


def _gated_mlp_rules(model: Any) -> list[PatchRule]:
    from .forwards import gated_mlp_forward, is_standard_gated_mlp
    from .kernels.swiglu import activation_params

    for name, module in model.named_modules():
        if type(module).__name__ not in GATED_MLP_CLASSES:
            continue
        if not is_standard_gated_mlp(module):
            raise PatchError(
                f"fast_swiglu: the forward of {type(module).__name__} ('{name}') is not "
                "down_proj(act_fn(gate_proj(x)) * up_proj(x)) in this transformers version; "
                "switch fast_swiglu off"
            )
        try:
            activation_params(module)
        except ValueError as err:
            raise PatchError(f"fast_swiglu: module '{name}': {err}") from None
    return [
        PatchRule(
            name=RULE_NAMES["fast_swiglu"][0],
            feature="fast_swiglu",
            module_classes=GATED_MLP_CLASSES,
            model_types=FEATURES["fast_swiglu"].model_types,
            forward=gated_mlp_forward,
        )
    ]


def _rope_rules(model: Any) -> list[PatchRule]:
    from . import rope_patch

    checked: set[str] = set()
    for module in model.modules():
        modeling = rope_patch.rope_modeling_module(module)
        if modeling is None or modeling.__name__ in checked:
            continue
        if not rope_patch.is_standard_rope(rope_patch.original_function(modeling)):
            raise PatchError(
                f"fast_rope_embeddings: {modeling.__name__}.apply_rotary_pos_emb is not the "
                "standard rotary embedding in this transformers version; switch it off"
            )
        checked.add(modeling.__name__)
    return [
        PatchRule(
            name=RULE_NAMES["fast_rope_embeddings"][0],
            feature="fast_rope_embeddings",
            model_types=FEATURES["fast_rope_embeddings"].model_types,
            match=lambda m: rope_patch.rope_modeling_module(m) is not None,
            apply=lambda m: rope_patch.acquire(rope_patch.rope_modeling_module(m)),
        )
    ]


def _check_head(module: Any, kind: str) -> None:
    """Refuse a head the fused linear loss would get wrong (see ``support.CAUSAL_LM_HEADS``)."""
    cls = type(module).__name__
    names = set(inspect.unwrap(type(module).forward).__code__.co_names)
    transforms = {"final_logit_softcapping": "softcap", "logits_scaling": "scale"}
    for attr, expected in transforms.items():
        if attr in names and kind != expected:
            raise PatchError(
                f"fast_loss: {cls}.forward applies {attr} to the logits, which the fused loss "
                "does not expect for this class; switch fast_loss off"
            )
    from .loss import head_bias

    head = module.get_output_embeddings()
    if head is None:
        raise PatchError(f"fast_loss: {cls} has no output embeddings (lm_head) to fuse")
    if kind == "scale" and head_bias(head) is not None:
        raise PatchError(
            f"fast_loss: {cls} scales its logits and its lm_head has a bias, so the fused "
            "linear cross-entropy would differ; use fast_loss cross_entropy"
        )


def _loss_rules(model: Any, mode: str) -> list[PatchRule]:
    from .loss import install_cross_entropy_loss, install_fused_linear_loss

    fused = mode == "fused_linear"
    for module in model.modules():
        kind = CAUSAL_LM_HEADS.get(type(module).__name__)
        if kind is not None and fused:
            _check_head(module, kind)

    def apply(module: Any) -> Callable[[], None]:
        if fused:
            return install_fused_linear_loss(module, CAUSAL_LM_HEADS[type(module).__name__])
        return install_cross_entropy_loss(module)

    return [
        PatchRule(
            name=RULE_NAMES["fast_loss"][int(fused)],
            feature="fast_loss",
            module_classes=tuple(CAUSAL_LM_HEADS),
            model_types=FEATURES["fast_loss"].model_types,
            apply=apply,
        )
    ]


def _lora_rules(model: Any, base_layer: str) -> list[PatchRule]:
    from .kernels.fused_lora import fused_lora_forward
    from .lora import check_fusable

    targets = {id(m) for m in check_fusable(model, base_layer)}
    return [
        PatchRule(
            name=RULE_NAMES["fused_lora"][0],
            feature="fused_lora",
            model_types=FEATURES["fused_lora"].model_types,
            match=lambda m: id(m) in targets,
            forward=lambda m: bind(fused_lora_forward, m),
        )
    ]


def build_rules(settings: FusedOpsConfig, model: Any) -> list[PatchRule]:
    """The rules for every feature switched on in ``settings``, checked against ``model``.

    Raises PatchError (nothing patched yet) when a feature cannot patch this model.
    """
    features = requested_features(settings)
    for feature in features:
        check_supported(feature, model)
    rules: list[PatchRule] = []
    for feature in features:
        if feature == "fused_lora":
            rules += _lora_rules(model, str(settings.base_layer))
        elif feature == "fast_rms_layernorm":
            rules += _rms_norm_rules(model)
        elif feature == "fast_swiglu":
            rules += _gated_mlp_rules(model)
        elif feature == "fast_rope_embeddings":
            rules += _rope_rules(model)
        else:
            rules += _loss_rules(model, str(settings.loss_mode))
    return rules

"""Causal-LM heads -> the fused loss: the head checks and the loss rules.

``support.Architecture.heads`` says what each causal-LM class does to the lm_head output
before ``loss_function`` ("none", "scale", "softcap"); the fused linear cross-entropy applies
the same transform inside its chunks. Before any rule is returned, a class whose forward
applies a transform the table does not list, or a scaled head with a bias (scaling would not
commute with it), is refused. The loss hook itself (what is installed) is
:mod:`accel_fused_ops.integration.loss`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from accel.api import PatchError, PatchRule

from ..support import CAUSAL_LM_HEADS, supported_types


def check_head(module: Any, kind: str) -> None:
    """Refuse a head the fused linear loss would get wrong."""
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


def rules(settings: Any, model: Any) -> list[PatchRule]:
    """The loss rule of ``settings.loss_mode``: ``cross_entropy_loss`` or
    ``linear_cross_entropy_loss``."""
    from .loss import install_cross_entropy_loss, install_fused_linear_loss

    fused = settings.loss_mode == "fused_linear"
    for module in model.modules():
        kind = CAUSAL_LM_HEADS.get(type(module).__name__)
        if kind is not None and fused:
            check_head(module, kind)

    def apply(module: Any) -> Callable[[], None]:
        if fused:
            return install_fused_linear_loss(
                module, CAUSAL_LM_HEADS[type(module).__name__], settings
            )
        return install_cross_entropy_loss(module, settings)

    return [
        PatchRule(
            name="linear_cross_entropy_loss" if fused else "cross_entropy_loss",
            feature="fast_loss",
            module_classes=tuple(CAUSAL_LM_HEADS),
            model_types=supported_types("fast_loss"),
            apply=apply,
        )
    ]

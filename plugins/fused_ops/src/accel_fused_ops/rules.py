"""The patch rules of the fused_ops plugin, built from the feature records.

:func:`build_rules` checks everything it can *before* returning rules: each requested
feature's support for the architecture (the table in :mod:`accel_fused_ops.support`), then
the feature's builder checks the modules themselves (classes whose forward changed in this
transformers version, LoRA layers that cannot be fused), so a refused request raises
:class:`accel.PatchError` with nothing patched. The core applies the rules in order, counts the
modules each one patched, and raises when a requested feature patched nothing.
"""

from __future__ import annotations

from typing import Any

from accel.api import PatchError, PatchRule, model_type_of

from .config import FusedOpsConfig
from .features import requested
from .support import support_of, supported_types


def model_name(model: Any) -> str:
    """The class of the transformers model, looking through a PEFT wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__


def check_supported(feature: str, model: Any) -> None:
    """Raise PatchError, with the table's reason, when ``feature`` does not support the model's
    architecture."""
    model_type = model_type_of(model)
    support = support_of(model_type, feature)
    if support.supported:
        return
    raise PatchError(
        f"{feature} cannot patch {model_name(model)} (model_type {model_type!r}): "
        f"{support.reason}. Supported model types: {', '.join(supported_types(feature))}. "
        f"Switch {feature} off for this model."
    )


def build_rules(settings: FusedOpsConfig, model: Any) -> list[PatchRule]:
    """The rules for every feature switched on in ``settings``, checked against ``model``.

    Raises PatchError (nothing patched yet) when a feature cannot patch this model.
    """
    features = requested(settings)
    for feature in features:
        check_supported(feature.name, model)
    rules: list[PatchRule] = []
    for feature in features:
        rules += feature.build(settings, model)
    return rules


__all__ = ["build_rules", "check_supported"]

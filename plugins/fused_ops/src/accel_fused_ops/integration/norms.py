"""RMSNorm modules -> the fused ``rms_norm`` op: which family a class belongs to, and its forward.

transformers copies RMSNorm into every modeling file and the copies differ in the name of the
eps attribute and in rounding; the support table (``support.Architecture.norms``) maps each
class to one of :data:`FAMILIES`. At patch time the class's forward is compared (bytecode) with
the family's frozen reference below, so a class whose forward changed is refused, not mis-fused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accel.api import PatchError, PatchRule, shape_difference

from ..kernels.rms_norm import rms_norm
from ..support import NORM_CLASSES, supported_types


@dataclass(frozen=True)
class NormFamily:
    """How one family of RMSNorm classes computes: ``rms_norm(x, weight, eps, offset, casting)``."""

    eps_attr: str
    offset: float
    casting: str
    #: the family's methods as transformers writes them (compared by bytecode)
    reference: type


# The methods of the three families as transformers writes them (compared by bytecode, never
# called): a class matches when every method below has the same bytecode and names in it.
class _LlamaReference:
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _OlmoReference:
    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * hidden_states).to(input_dtype)


class _GemmaReference:
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


FAMILIES = {
    "llama": NormFamily("variance_epsilon", 0.0, "llama", _LlamaReference),
    "gemma": NormFamily("eps", 1.0, "gemma", _GemmaReference),
    "olmo": NormFamily("variance_epsilon", 0.0, "gemma", _OlmoReference),
}


def family_of(module: nn.Module) -> tuple[str, NormFamily]:
    """The family of an RMSNorm module (its class, or a base class, in the support table)."""
    for cls in type(module).__mro__:
        if cls.__name__ in NORM_CLASSES:
            name = NORM_CLASSES[cls.__name__]
            return name, FAMILIES[name]
    raise ValueError(
        f"no fused RMSNorm equivalent is known for {type(module).__name__}; known classes are "
        f"{', '.join(sorted(NORM_CLASSES))}. Leave this module unpatched, or add its class to "
        "the support table (accel_fused_ops.support) after checking its forward"
    )


def rms_norm_params(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make ``rms_norm(x, module.weight, **kw)`` equal ``module(x)``:
    ``{"eps": float, "offset": float, "casting": str}``. Raises ValueError for an unknown
    class or one whose forward is not its family's."""
    name, family = family_of(module)
    methods = [m for m in vars(family.reference) if not m.startswith("__")]
    cls = type(module)
    for method in methods:
        difference = shape_difference(getattr(cls, method, None), vars(family.reference)[method])
        if difference:
            raise ValueError(
                f"the {method} of {type(module).__name__} is not the {name}-family RMSNorm "
                f"{method} in this transformers version ({difference})"
            )
    return {
        "eps": float(getattr(module, family.eps_attr)),
        "offset": family.offset,
        "casting": family.casting,
    }


def is_rms_norm(module: Any) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def rms_norm_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused forward for one RMSNorm instance (eps, offset and rounding taken from it)."""
    params = rms_norm_params(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, getattr(module, "weight", None), **params)

    return forward


def rules(settings: Any, model: nn.Module) -> list[PatchRule]:
    """The ``rms_norm`` rule; refuses (PatchError) any RMSNorm module it cannot reproduce."""
    for name, module in model.named_modules():
        if is_rms_norm(module):
            try:
                rms_norm_params(module)
            except ValueError as err:
                raise PatchError(f"fast_rms_layernorm: module '{name}': {err}") from None
    return [
        PatchRule(
            name="rms_norm",
            feature="fast_rms_layernorm",
            model_types=supported_types("fast_rms_layernorm"),
            match=is_rms_norm,
            forward=rms_norm_forward,
        )
    ]

"""Replacement forwards for RMSNorm and gated-MLP module instances.

They call the submodules the original forward calls (``gate_proj``/``up_proj``/``down_proj``
through ``__call__``, so PEFT LoRA wrappers and hooks still run) and in the same order, so the
RNG stream (LoRA dropout) is consumed exactly as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .kernels.rms_norm import rms_norm, rms_norm_params
from .kernels.swiglu import activation_params, gated_activation


def rms_norm_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused forward for one RMSNorm instance (eps, offset and rounding taken from it)."""
    params = rms_norm_params(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, module.weight, **params)

    return forward


def _reference_gated_mlp(self: Any, x: Any) -> Any:
    # Byte-for-byte the forward of transformers' gated MLPs; compared by bytecode below.
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _code_key(function: Any) -> tuple[Any, ...] | None:
    code = getattr(inspect.unwrap(function), "__code__", None)
    if code is None:
        return None
    return code.co_code, code.co_names, code.co_varnames


def is_standard_gated_mlp(module: nn.Module) -> bool:
    """True when the module's class forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    return _code_key(type(module).forward) == _code_key(_reference_gated_mlp)


def gated_mlp_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused forward for one gated MLP: the activation and the product in one kernel."""
    params = activation_params(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate = module.gate_proj(x)
        up = module.up_proj(x)
        return module.down_proj(gated_activation(gate, up, **params))

    return forward

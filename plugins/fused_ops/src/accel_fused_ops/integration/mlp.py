"""Gated MLP modules -> the fused gated activation: the forms their forward takes, the activation
they compute, and the replacement forward.

Forms (``support.Architecture.mlps`` maps each class to one):

* ``gate_up_down``: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Llama, Qwen, Gemma, ...);
* ``fused_gate_up``: ``gate_up_proj`` output split in two halves, gate first (Phi3);
* ``fused_gate_up_io``: the same with ``input_linear``/``output_linear`` (Granite 4 hybrid's
  dense MLP).

Each form has a frozen copy of the forward transformers writes; a class whose forward differs
(bytecode) is refused. The replacement calls the projections through ``__call__`` in the
original order (PEFT LoRA wrappers and hooks still run, LoRA dropout draws the same masks) and
only the activation and product run in the fused op; the fused halves are strided views, which
the kernel reads in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accel.api import PatchError, PatchRule, shape_difference

from ..kernels.swiglu import gated_activation
from ..support import MLP_CLASSES, supported_types


# The forwards as transformers writes them (compared by bytecode, never called).
def _gate_up_down(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _fused_gate_up(self, hidden_states):
    up_states = self.gate_up_proj(hidden_states)

    gate, up_states = up_states.chunk(2, dim=-1)
    up_states = up_states * self.activation_fn(gate)

    return self.down_proj(up_states)


def _fused_gate_up_io(self, hidden_states):
    hidden_states = self.input_linear(hidden_states)
    chunked_hidden_states = hidden_states.chunk(2, dim=-1)
    hidden_states = self.activation(chunked_hidden_states[0]) * chunked_hidden_states[1]
    hidden_states = self.output_linear(hidden_states)
    return hidden_states


def _fused_forward(
    module: nn.Module, params: dict[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate = module.gate_proj(x)
        up = module.up_proj(x)
        return module.down_proj(gated_activation(gate, up, **params))

    return forward


def _fused_gate_up_forward(
    module: nn.Module, params: dict[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
        return module.down_proj(gated_activation(gate, up, **params))

    return forward


def _fused_io_forward(
    module: nn.Module, params: dict[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = module.input_linear(x).chunk(2, dim=-1)
        return module.output_linear(gated_activation(gate, up, **params))

    return forward


@dataclass(frozen=True)
class MlpForm:
    """One way transformers writes a gated MLP forward."""

    reference: Callable[..., Any]
    #: the attribute holding the activation module
    activation_attr: str
    build: Callable[[nn.Module, dict[str, Any]], Callable[[torch.Tensor], torch.Tensor]]


FORMS = {
    "gate_up_down": MlpForm(_gate_up_down, "act_fn", _fused_forward),
    "fused_gate_up": MlpForm(_fused_gate_up, "activation_fn", _fused_gate_up_forward),
    "fused_gate_up_io": MlpForm(_fused_gate_up_io, "activation", _fused_io_forward),
}


def form_of(module: nn.Module) -> tuple[str, MlpForm]:
    """The form of a gated MLP module listed in the support table; ValueError if its forward
    is not that form's."""
    cls = type(module).__name__
    if cls not in MLP_CLASSES:
        raise ValueError(f"{cls} is not a gated MLP class of the support table")
    name = MLP_CLASSES[cls]
    form = FORMS[name]
    difference = shape_difference(type(module).forward, form.reference)
    if difference:
        raise ValueError(
            f"the forward of {cls} is not the {name!r} gated MLP form in this transformers "
            f"version ({difference})"
        )
    return name, form


# ACT2FN names (``config.hidden_act`` / ``hidden_activation``) and what they compute.
_BY_NAME = {
    "silu": {"kind": "swiglu"},
    "swish": {"kind": "swiglu"},
    "gelu_pytorch_tanh": {"kind": "geglu", "approximate": "tanh"},
    "gelu_python_tanh": {"kind": "geglu", "approximate": "tanh"},
    "gelu_new": {"kind": "geglu", "approximate": "tanh"},
    "gelu": {"kind": "geglu", "approximate": "none"},
    "gelu_python": {"kind": "geglu", "approximate": "none"},
}
# transformers.activations classes, matched by name (and module) to avoid importing it.
_BY_CLASS = {
    "SiLUActivation": {"kind": "swiglu"},
    "GELUTanh": {"kind": "geglu", "approximate": "tanh"},
    "NewGELUActivation": {"kind": "geglu", "approximate": "tanh"},
    "GELUActivation": {"kind": "geglu", "approximate": "none"},
}
_ACTIVATION_ATTRS = tuple(dict.fromkeys(f.activation_attr for f in FORMS.values()))


def _params_of_activation(act: object) -> dict | None:
    if isinstance(act, str):
        return _BY_NAME.get(act)
    if isinstance(act, nn.SiLU):
        return {"kind": "swiglu"}
    if isinstance(act, nn.GELU):
        return {"kind": "geglu", "approximate": act.approximate}
    for cls in type(act).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return None


def activation_params(mlp_or_activation: object) -> dict:
    """Which gated activation a transformers MLP computes, as ``gated_activation`` kwargs.

    Accepts an MLP module (its activation module, else its ``config.hidden_act`` /
    ``hidden_activation``), an activation module (``ACT2FN[...]``, ``nn.SiLU``, ``nn.GELU``) or
    an ACT2FN name. Returns ``{"kind": "swiglu"}`` or ``{"kind": "geglu", "approximate":
    "tanh" | "none"}``; raises ``ValueError`` for any other activation, because fusing it
    with the wrong formula would silently change the model.
    """
    candidates = []
    act_fn = next(
        (getattr(mlp_or_activation, a) for a in _ACTIVATION_ATTRS if hasattr(mlp_or_activation, a)),
        None,
    )
    if act_fn is not None:
        candidates.append(act_fn)
    else:
        config = getattr(mlp_or_activation, "config", None)
        for attr in ("hidden_activation", "hidden_act"):
            if isinstance(getattr(config, attr, None), str):
                candidates.append(getattr(config, attr))
                break
        candidates.append(mlp_or_activation)
    for candidate in candidates:
        params = _params_of_activation(candidate)
        if params is not None:
            return dict(params)
    found = candidates[0] if isinstance(candidates[0], str) else type(candidates[0]).__name__
    raise ValueError(
        f"activation_params: {found!r} is not an activation the fused gated MLP supports; "
        f"supported ACT2FN names are {', '.join(sorted(_BY_NAME))} (and nn.SiLU / nn.GELU). "
        "Leave this MLP unpatched."
    )


def gated_mlp_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fused forward for one gated MLP: the activation and the product in one kernel."""
    _, form = form_of(module)
    return form.build(module, activation_params(module))


def rules(settings: Any, model: nn.Module) -> list[PatchRule]:
    """The ``gated_mlp`` rule; refuses (PatchError) a listed MLP class it cannot reproduce."""
    for name, module in model.named_modules():
        if type(module).__name__ not in MLP_CLASSES:
            continue
        try:
            form_of(module)
        except ValueError as err:
            raise PatchError(
                f"fast_swiglu: module '{name}': {err}; switch fast_swiglu off"
            ) from None
        try:
            activation_params(module)
        except ValueError as err:
            raise PatchError(f"fast_swiglu: module '{name}': {err}") from None
    return [
        PatchRule(
            name="gated_mlp",
            feature="fast_swiglu",
            module_classes=tuple(MLP_CLASSES),
            model_types=supported_types("fast_swiglu"),
            forward=gated_mlp_forward,
        )
    ]

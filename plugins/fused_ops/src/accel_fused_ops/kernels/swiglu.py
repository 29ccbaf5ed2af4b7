"""Gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``.

This is the ``act_fn(gate_proj(x)) * up_proj(x)`` product of Llama/Mistral/Qwen/Granite
(SiLU) and Gemma (tanh GELU) MLPs, fused so the activation is never stored: forward writes
only the product, backward recomputes the activation from ``gate`` (only ``gate`` and ``up``
are saved, both of which the projections' own backward keeps alive anyway).

Three parts: a Triton kernel pair (fp32 inside, cast on store), a pure-PyTorch version (CPU
path, test oracle) and an autograd Function with a hand-written backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import choose_impl

KINDS = ("swiglu", "geglu")
APPROXIMATIONS = ("tanh", "none")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715

# Activation ids shared by the kernels (constexpr) and the PyTorch path.
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) for fp32 ``g``; ACT is _SILU (0), _GELU_TANH (1) or _GELU_ERF (2)."""
    if ACT == 0:
        act = g * tl.sigmoid(g)
    elif ACT == 1:  # 0.5 * (1 + tanh(z)) == sigmoid(2z); triton.language has no tanh
        act = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:
        act = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    return act


@triton.jit
def _activation_with_grad(g, ACT: tl.constexpr):
    """(act(g), d act / d g) for fp32 ``g``."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        # With h = 0.5 * (1 + tanh(z)) = sigmoid(2z): act = g * h and
        # d act / d g = h + g * 2 * h * (1 - h) * dz/dg (no 1 + tanh cancellation).
        h = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        act = g * h
        dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        grad = h + 2.0 * g * h * (1.0 - h) * dz
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return act, grad


@triton.jit
def _gated_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_elements,
    n_cols,
    gate_row_stride,
    up_row_stride,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // n_cols, idx % n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    act = _activation(g, ACT)
    tl.store(out_ptr + idx, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    dy_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_elements,
    n_cols,
    gate_row_stride,
    up_row_stride,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // n_cols, idx % n_cols
    dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    act, grad = _activation_with_grad(g, ACT)
    tl.store(dgate_ptr + idx, (dy * u * grad).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + idx, (dy * act).to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C) view with unit column stride (a view for slices of a fused gate_up output)."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _triton_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    g2d, u2d = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = out.numel()
    if n == 0:
        return out
    _gated_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
        g2d, u2d, out, n, gate.shape[-1], g2d.stride(0), u2d.stride(0), ACT=act, BLOCK=_BLOCK
    )
    return out


def _triton_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g2d, u2d = _rows(gate), _rows(up)
    dy = dy.contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    n = dy.numel()
    if n == 0:
        return dgate, dup
    _gated_bwd_kernel[(triton.cdiv(n, _BLOCK),)](
        dy,
        g2d,
        u2d,
        dgate,
        dup,
        n,
        gate.shape[-1],
        g2d.stride(0),
        u2d.stride(0),
        ACT=act,
        BLOCK=_BLOCK,
    )
    return dgate, dup


# --------------------------------------------------------------------------- PyTorch path


def _torch_activation_and_grad(g: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same math as the kernel, on fp32 ``g``."""
    if act == _SILU:
        sig = torch.sigmoid(g)
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    if act == _GELU_TANH:
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g.pow(3)))
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    cdf = 0.5 * (1.0 + torch.erf(g * _INV_SQRT_2))
    return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI


def _torch_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int
) -> tuple[torch.Tensor, torch.Tensor]:
    activated, grad = _torch_activation_and_grad(gate.float(), act)
    dyf = dy.float()
    return (dyf * up.float() * grad).to(gate.dtype), (dyf * activated).to(up.dtype)


def gated_activation_reference(
    gate: torch.Tensor, up: torch.Tensor, kind: str = "swiglu", approximate: str = "tanh"
) -> torch.Tensor:
    """``act(gate) * up`` written as transformers MLPs write it (same rounding); the CPU path."""
    if kind == "swiglu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


_ACT_ARGS = {_SILU: ("swiglu", "none"), _GELU_TANH: ("geglu", "tanh"), _GELU_ERF: ("geglu", "none")}


def _torch_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    return gated_activation_reference(gate, up, *_ACT_ARGS[act])


# --------------------------------------------------------------------------- autograd + API


class GatedActivationFunction(torch.autograd.Function):
    """``act(gate) * up``; backward recomputes ``act`` from the saved ``gate``."""

    @staticmethod
    def forward(ctx, gate, up, act, impl):
        forward = _triton_forward if impl == "triton" else _torch_forward
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.impl = act, impl
        return forward(gate, up, act)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        backward = _triton_backward if ctx.impl == "triton" else _torch_backward
        dgate, dup = backward(dy, gate, up, ctx.act)
        return dgate, dup, None, None


def _gated(gate: torch.Tensor, up: torch.Tensor, act: int, fn_name: str) -> torch.Tensor:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn_name}: {name} must be a tensor, got {type(t).__name__}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"{fn_name}: gate and up must have the same shape, dtype and device (the outputs "
            f"of gate_proj and up_proj); got gate {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and up {tuple(up.shape)} {up.dtype} {up.device}"
        )
    if gate.dim() == 0:
        raise ValueError(f"{fn_name}: gate and up must have at least one dimension")
    impl = choose_impl(gate)
    if impl == "triton" and gate.dtype not in _TRITON_DTYPES:
        impl = "torch"
    return GatedActivationFunction.apply(gate, up, act, impl)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama-style MLP), differentiable in both inputs."""
    return _gated(gate, up, _SILU, "swiglu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (Gemma-style MLP), differentiable in both inputs."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(
            f"geglu: approximate={approximate!r} is not valid; expected one of {APPROXIMATIONS}"
        )
    return _gated(gate, up, _GELU_TANH if approximate == "tanh" else _GELU_ERF, "geglu")


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, kind: str = "swiglu", approximate: str = "tanh"
) -> torch.Tensor:
    """``swiglu`` or ``geglu`` by name; pairs with ``activation_params(mlp)``."""
    if kind == "swiglu":
        return swiglu(gate, up)
    if kind == "geglu":
        return geglu(gate, up, approximate)
    raise ValueError(f"gated_activation: kind={kind!r} is not valid; expected one of {KINDS}")


# --------------------------------------------------------------------------- module lookup

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
# transformers.activations classes, matched by name so this module does not import it.
_BY_CLASS = {
    "SiLUActivation": {"kind": "swiglu"},
    "GELUTanh": {"kind": "geglu", "approximate": "tanh"},
    "NewGELUActivation": {"kind": "geglu", "approximate": "tanh"},
    "GELUActivation": {"kind": "geglu", "approximate": "none"},
}


def _params_of_activation(act: object) -> dict | None:
    if isinstance(act, str):
        return _BY_NAME.get(act)
    if isinstance(act, torch.nn.SiLU):
        return {"kind": "swiglu"}
    if isinstance(act, torch.nn.GELU):
        return {"kind": "geglu", "approximate": act.approximate}
    for cls in type(act).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return None


def activation_params(mlp_or_activation: object) -> dict:
    """Which gated activation a transformers MLP computes, as ``gated_activation`` kwargs.

    Accepts an MLP module (its ``act_fn``, else its ``config.hidden_act`` /
    ``hidden_activation``), an activation module (``ACT2FN[...]``, ``nn.SiLU``, ``nn.GELU``) or
    an ACT2FN name. Returns ``{"kind": "swiglu"}`` or ``{"kind": "geglu", "approximate":
    "tanh" | "none"}``; raises ``ValueError`` for any other activation, because fusing it
    with the wrong formula would silently change the model.
    """
    candidates = []
    act_fn = getattr(mlp_or_activation, "act_fn", None)
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

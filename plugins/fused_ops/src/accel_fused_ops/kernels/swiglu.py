"""Gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up``.

This is the ``act_fn(gate_proj(x)) * up_proj(x)`` product of Llama/Mistral/Qwen/Granite
(SiLU) and Gemma (tanh GELU) MLPs, fused so the activation is never stored: forward writes
only the product, backward recomputes the activation from ``gate`` (only ``gate`` and ``up``
are saved, both of which the projections' own backward keeps alive anyway).

Multipliers (Falcon-H1's ``mlp_multipliers``): ``act(gate * gate_multiplier) * up *
out_multiplier``. ``gate * gate_multiplier`` is rounded to the input dtype before the
activation, as the model's own product is; ``out_multiplier`` scales the product, which equals
scaling the output of a bias-free ``down_proj`` (Falcon-H1's ``down_multiplier``).

Rounding in bf16/fp16 follows the unfused module, step by step: ``act(gate)`` is rounded to
the dtype before the product, the product is rounded, and backward rounds ``dy * act`` (the
``up`` gradient) and ``dy * up`` before the activation's derivative, as autograd does; the
activation formulas are torch's own. Rounding once in fp32 instead is not more accurate where
it matters: on Liger-Kernel's GeGLU MLP shape (369 tokens, hidden 341, intermediate 4231,
randn weights, bf16) the max errors against a float64 run of the same module are about equal
for transformers' order and single rounding: output 283 vs 298, input gradient 553 vs 553,
projection weight gradients 111-124 vs 111-120. Yet single rounding differs from transformers
by up to 512 (input gradient) there, and by one bf16 step in 25% of the products for gate
values ~ 2 * randn, so a patched model would not train like the unpatched one. With
transformers' order the PyTorch path is bit for bit transformers' and the Triton kernel
differs in a last bit here and there (exp / tanh / erf).

Four parts: a Triton kernel pair (fp32 inside, rounded like the module), the PyTorch reference
(:func:`gated_activation_reference`: CPU path, test oracle), an autograd Function with a
hand-written backward and the public ops. Which activation a module computes is model glue:
``accel_fused_ops.integration.mlp``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import as_rows, pick_impl
from accel_fused_ops.kernels.cross_entropy import _tanh

KINDS = ("swiglu", "geglu")
APPROXIMATIONS = ("tanh", "none")
_BLOCK = 1024

# Activation ids shared by the kernels (constexpr) and the PyTorch path.
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) for fp32 ``g``; ACT is _SILU (0), _GELU_TANH (1) or _GELU_ERF (2).

    Each formula is torch's own (``silu``, ``gelu``), in its order of operations, so the
    values rounded to bf16 are torch's but for the last fp32 bit of exp / tanh / erf.
    """
    if ACT == 0:
        act = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        act = 0.5 * g * (1.0 + _tanh(inner))
    else:
        act = g * 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
    return act


@triton.jit
def _activation_with_grad(g, ACT: tl.constexpr):
    """(act(g), d act / d g) for fp32 ``g``, with torch's formulas of the derivative."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        act = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        g2 = g * g
        t = _tanh(0.7978845608028654 * (g + 0.044715 * (g2 * g)))
        left = 0.5 * g
        act = left * (1.0 + t)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g2)
        grad = 0.5 * (1.0 + t) + left * (1.0 - t * t) * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        grad = cdf + g * (0.3989422804014327 * tl.exp(g * g * -0.5))
    return act, grad


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even), returned as fp32.

    bf16 is rounded on the bits because the Triton interpreter truncates fp32 -> bf16 casts,
    while GPUs round them to nearest: this way both give the same values.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        out = x.to(dtype).to(tl.float32)
    return out


@triton.jit
def _gated_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_elements,
    n_cols,
    gate_row_stride,
    up_row_stride,
    gate_mul,
    out_mul,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // n_cols, idx % n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask, other=0.0)
    # the model rounds gate * multiplier to its dtype (exact when the multiplier is 1)
    g = _rounded(g.to(tl.float32) * gate_mul, gate_ptr.dtype.element_ty)
    u = tl.load(up_ptr + row * up_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # Rounded like the unfused module: act(g) to the dtype, then the product, then the
    # product times the multiplier (each rounding is exact in fp32 and for a multiplier of 1).
    act = _rounded(_activation(g, ACT), dt)
    out = _rounded(_rounded(act * u, dt) * out_mul, dt)
    tl.store(out_ptr + idx, out.to(dt), mask=mask)


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
    gate_mul,
    out_mul,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    row, col = idx // n_cols, idx % n_cols
    dt = dgate_ptr.dtype.element_ty
    dy = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dy = _rounded(dy * out_mul, dt)
    g = tl.load(gate_ptr + row * gate_row_stride + col, mask=mask, other=0.0)
    g = _rounded(g.to(tl.float32) * gate_mul, dt)
    u = tl.load(up_ptr + row * up_row_stride + col, mask=mask, other=0.0).to(tl.float32)
    act, grad = _activation_with_grad(g, ACT)
    # Autograd's rounding of the unfused module: d up = dy * act(g) with act(g) rounded,
    # d act = dy * up rounded before the activation's derivative, then the multiplier.
    d_up = _rounded(dy * _rounded(act, dt), dt)
    d_act = _rounded(dy * u, dt)
    dgate = _rounded(_rounded(d_act * grad, dt) * gate_mul, dt)
    tl.store(dgate_ptr + idx, dgate.to(dt), mask=mask)
    tl.store(dup_ptr + idx, d_up.to(dup_ptr.dtype.element_ty), mask=mask)


def _triton_forward(
    gate: torch.Tensor, up: torch.Tensor, act: int, gate_mul: float, out_mul: float
) -> torch.Tensor:
    g2d, u2d = as_rows(gate), as_rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = out.numel()
    if n == 0:
        return out
    _gated_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
        g2d,
        u2d,
        out,
        n,
        gate.shape[-1],
        g2d.stride(0),
        u2d.stride(0),
        gate_mul,
        out_mul,
        ACT=act,
        BLOCK=_BLOCK,
    )
    return out


def _triton_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    gate_mul: float,
    out_mul: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    g2d, u2d = as_rows(gate), as_rows(up)
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
        gate_mul,
        out_mul,
        ACT=act,
        BLOCK=_BLOCK,
    )
    return dgate, dup


# --------------------------------------------------------------------------- PyTorch path


def _torch_backward(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    gate_mul: float,
    out_mul: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What autograd computes through :func:`gated_activation_reference`, op by op (same
    rounding in every dtype), without keeping its intermediates alive."""
    scaled = gate if gate_mul == 1.0 else gate * gate_mul
    if out_mul != 1.0:
        dy = dy * out_mul
    kind, approximate = _ACT_ARGS[act]
    if kind == "swiglu":
        activated = torch.nn.functional.silu(scaled)
        d_scaled = torch.ops.aten.silu_backward(dy * up, scaled)
    else:
        activated = torch.nn.functional.gelu(scaled, approximate=approximate)
        d_scaled = torch.ops.aten.gelu_backward(dy * up, scaled, approximate=approximate)
    d_gate = d_scaled if gate_mul == 1.0 else d_scaled * gate_mul
    return d_gate, dy * activated


def gated_activation_reference(
    gate: torch.Tensor,
    up: torch.Tensor,
    kind: str = "swiglu",
    approximate: str = "tanh",
    *,
    gate_multiplier: float = 1.0,
    out_multiplier: float = 1.0,
) -> torch.Tensor:
    """``act(gate * gate_multiplier) * up * out_multiplier`` written as transformers MLPs write
    it (same rounding, no multiply by a multiplier of 1); the CPU path and the oracle."""
    if gate_multiplier != 1.0:
        gate = gate * gate_multiplier
    if kind == "swiglu":
        out = torch.nn.functional.silu(gate) * up
    else:
        out = torch.nn.functional.gelu(gate, approximate=approximate) * up
    return out if out_multiplier == 1.0 else out * out_multiplier


_ACT_ARGS = {_SILU: ("swiglu", "none"), _GELU_TANH: ("geglu", "tanh"), _GELU_ERF: ("geglu", "none")}


def _torch_forward(
    gate: torch.Tensor, up: torch.Tensor, act: int, gate_mul: float, out_mul: float
) -> torch.Tensor:
    return gated_activation_reference(
        gate, up, *_ACT_ARGS[act], gate_multiplier=gate_mul, out_multiplier=out_mul
    )


# --------------------------------------------------------------------------- autograd + API


class GatedActivationFunction(torch.autograd.Function):
    """``act(gate) * up``; backward recomputes ``act`` from the saved ``gate``."""

    @staticmethod
    def forward(ctx, gate, up, act, gate_mul, out_mul, impl):
        forward = _triton_forward if impl == "triton" else _torch_forward
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.impl, ctx.muls = act, impl, (gate_mul, out_mul)
        return forward(gate, up, act, gate_mul, out_mul)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        backward = _triton_backward if ctx.impl == "triton" else _torch_backward
        dgate, dup = backward(dy, gate, up, ctx.act, *ctx.muls)
        return dgate, dup, None, None, None, None


def _gated(
    gate: torch.Tensor,
    up: torch.Tensor,
    act: int,
    fn_name: str,
    gate_multiplier: float,
    out_multiplier: float,
) -> torch.Tensor:
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
    for name, value in (("gate_multiplier", gate_multiplier), ("out_multiplier", out_multiplier)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{fn_name}: {name} must be a number, got {type(value).__name__}")
    impl = pick_impl(gate)
    return GatedActivationFunction.apply(
        gate, up, act, float(gate_multiplier), float(out_multiplier), impl
    )


def swiglu(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    gate_multiplier: float = 1.0,
    out_multiplier: float = 1.0,
) -> torch.Tensor:
    """``silu(gate * gate_multiplier) * up * out_multiplier`` (Llama-style MLP, Falcon-H1 with
    multipliers), differentiable in both inputs."""
    return _gated(gate, up, _SILU, "swiglu", gate_multiplier, out_multiplier)


def geglu(
    gate: torch.Tensor,
    up: torch.Tensor,
    approximate: str = "tanh",
    *,
    gate_multiplier: float = 1.0,
    out_multiplier: float = 1.0,
) -> torch.Tensor:
    """``gelu(gate * gate_multiplier, approximate) * up * out_multiplier`` (Gemma-style MLP),
    differentiable in both inputs."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(
            f"geglu: approximate={approximate!r} is not valid; expected one of {APPROXIMATIONS}"
        )
    act = _GELU_TANH if approximate == "tanh" else _GELU_ERF
    return _gated(gate, up, act, "geglu", gate_multiplier, out_multiplier)


def gated_activation(
    gate: torch.Tensor,
    up: torch.Tensor,
    kind: str = "swiglu",
    approximate: str = "tanh",
    *,
    gate_multiplier: float = 1.0,
    out_multiplier: float = 1.0,
) -> torch.Tensor:
    """``swiglu`` or ``geglu`` by name; pairs with ``integration.mlp.activation_params``."""
    muls = {"gate_multiplier": gate_multiplier, "out_multiplier": out_multiplier}
    if kind == "swiglu":
        return swiglu(gate, up, **muls)
    if kind == "geglu":
        return geglu(gate, up, approximate, **muls)
    raise ValueError(f"gated_activation: kind={kind!r} is not valid; expected one of {KINDS}")

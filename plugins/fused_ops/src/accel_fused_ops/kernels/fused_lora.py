"""LoRA linear layer as one autograd Function with a hand-written backward.

    y = x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T

``W`` is the frozen base weight (dense, bitsandbytes 4-bit or GPTQ, see ``dequant``), ``b``
its frozen bias, ``A``/``B`` the trainable LoRA factors. Why one Function:

* The quantised base weight is dequantised in forward and *again* in backward; the dense
  copy is never saved. Autograd over PEFT's modules keeps it (GPTQ's torch matmul saves the
  dequantised ``(in, out)`` weight of every layer until backward).
* What is saved: ``x`` itself (no copy: the caller keeps it alive anyway, and q/k/v share
  it), ``h = dropout(x) @ A^T`` (``N x r``, tiny, saves one matmul in backward) and, only
  when dropout is active, the boolean dropout mask (1 byte per element). Saving
  ``dropout(x)`` instead would cost a full-size copy of ``x`` in its dtype, and still would
  not give the mask where ``x == 0``, which the input gradient needs.
* The LoRA term is added into the base output by ``addmm`` with ``scaling`` as its ``alpha``
  (no extra ``N x out`` temporary when dtypes agree); in backward ``scaling`` and the dropout
  scale are folded into the small ``N x r`` gradient before the full-size products.

The matmuls are torch (cuBLAS on GPU); the Triton part is the GPTQ dequantisation in
``dequant``. Inputs of any rank are flattened to ``(N, in)``.

Dropout uses ``torch.native_dropout``, the op ``F.dropout`` runs on CUDA and that consumes
the RNG exactly like ``F.dropout`` on CPU: for a given RNG state the fused op draws the same
mask as PEFT's ``nn.Dropout``. Under autocast every matmul runs in the autocast dtype, as
PEFT's modules would; the Function then computes with autocast switched off and explicit
dtypes, so forward and backward agree.

Public ops: :func:`fused_lora_linear` (one projection) and :func:`fused_lora_multi` (several
projections of one input in one Function: ``x`` saved once, input gradients summed inside
backward). The reference is the unfused composition, :func:`fused_lora_reference`. Nothing here
knows PEFT: reading a PEFT LoRA layer (``can_fuse``, ``fused_lora_forward``) is model glue in
``accel_fused_ops.integration.lora``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from accel_fused_ops.kernels.dequant import FrozenWeight, frozen_weight

# --------------------------------------------------------------------------- the Function


@dataclass(frozen=True)
class LoraProjection:
    """One LoRA-adapted linear projection as the fused op sees it.

    Attributes:
        base: the frozen base layer's weight source.
        lora_A: LoRA down projection, shape ``(r, in_features)``.
        lora_B: LoRA up projection, shape ``(out_features, r)``.
        scaling: the LoRA scale (``lora_alpha / r`` or the rsLoRA value).
        dropout_p: dropout probability applied to the LoRA branch's input; pass 0.0 in eval.
    """

    base: FrozenWeight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float = 0.0


@dataclass(frozen=True)
class _Step:
    """Static per-projection data the Function needs besides its tensors."""

    base: FrozenWeight
    scaling: float
    dropout_p: float
    base_dtype: torch.dtype
    lora_dtype: torch.dtype
    out_dtype: torch.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


class _FusedLoraFunction(torch.autograd.Function):
    """Projections of one input ``x``; tensors come flat as ``(bias, A, B)`` per projection."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, steps: tuple[_Step, ...], *params: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            casts: dict[torch.dtype, torch.Tensor] = {}

            def x_as(dtype: torch.dtype) -> torch.Tensor:
                if dtype not in casts:
                    casts[dtype] = x2.to(dtype)
                return casts[dtype]

            outputs, saved = [], []
            for i, step in enumerate(steps):
                bias, lora_a, lora_b = params[3 * i : 3 * i + 3]
                weight = step.base.materialize(step.base_dtype)
                y = F.linear(x_as(step.base_dtype), weight, _cast(bias, step.base_dtype))
                del weight

                x_lora = x_as(step.lora_dtype)
                mask = None
                if step.dropout_p > 0.0:
                    x_lora, mask = torch.native_dropout(x_lora, step.dropout_p, True)
                h = x_lora @ lora_a.to(step.lora_dtype).t()
                del x_lora
                b_t = lora_b.to(step.lora_dtype).t()
                if y.dtype == step.lora_dtype:
                    y.addmm_(h, b_t, alpha=step.scaling)
                else:
                    y = torch.addmm(y.to(step.lora_dtype), h, b_t, alpha=step.scaling)
                outputs.append(y.to(step.out_dtype).reshape(*x.shape[:-1], y.shape[-1]))
                saved += [h, mask]

        ctx.steps = steps
        ctx.save_for_backward(x, *params, *saved)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        steps: tuple[_Step, ...] = ctx.steps
        x, *rest = ctx.saved_tensors
        n_params = 3 * len(steps)
        params, saved = rest[:n_params], rest[n_params:]
        needs_x = ctx.needs_input_grad[0]
        needs_param = ctx.needs_input_grad[2:]
        param_grads: list[torch.Tensor | None] = [None] * n_params

        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            grad_x: torch.Tensor | None = None
            for i, (step, grad_y) in enumerate(zip(steps, grad_outputs)):
                if grad_y is None:
                    continue
                bias, lora_a, lora_b = params[3 * i : 3 * i + 3]
                need_bias, need_a, need_b = needs_param[3 * i : 3 * i + 3]
                h, mask = saved[2 * i], saved[2 * i + 1]
                ldt, bdt = step.lora_dtype, step.base_dtype
                g = grad_y.reshape(-1, grad_y.shape[-1])
                g_lora = g.to(ldt)
                a = lora_a.to(ldt)

                if need_b:
                    grad_b = (g_lora.t() @ h).mul_(step.scaling)
                    param_grads[3 * i + 2] = grad_b.to(lora_b.dtype)
                if need_bias:
                    param_grads[3 * i] = g.to(bdt).sum(0).to(bias.dtype)
                if not (need_a or needs_x):
                    continue

                # Gradient w.r.t. dropout(x) @ A^T, with scaling and the dropout scale folded in
                # (N x r): the two full-size products below then need no extra scaling pass.
                gh = (g_lora @ lora_b.to(ldt)).mul_(step.scaling * _dropout_scale(step.dropout_p))
                if need_a:
                    x_kept = x2.to(ldt) if mask is None else x2.to(ldt).mul(mask)
                    param_grads[3 * i + 1] = (gh.t() @ x_kept).to(lora_a.dtype)
                    del x_kept
                if needs_x:
                    grad_x = _accumulate_input_grad(grad_x, step, g, gh, a, mask)

        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).reshape(x.shape)
        return (grad_x, None, *param_grads)


def _accumulate_input_grad(
    total: torch.Tensor | None,
    step: _Step,
    g: torch.Tensor,
    gh: torch.Tensor,
    lora_a: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """total + g @ W + (gh @ A) * mask, summed in the wider of the base and LoRA dtypes."""
    acc_dtype = torch.promote_types(step.base_dtype, step.lora_dtype)
    weight = step.base.materialize(step.base_dtype)
    g_base = g.to(step.base_dtype)
    if total is None:
        total = (g_base @ weight).to(acc_dtype)
    elif total.dtype == step.base_dtype:
        total.addmm_(g_base, weight)
    else:
        total.add_(g_base @ weight)
    del weight
    if mask is None and total.dtype == gh.dtype:
        return total.addmm_(gh, lora_a)
    lora_part = gh @ lora_a
    if mask is not None:
        lora_part.mul_(mask)
    return total.add_(lora_part)


def _make_step(projection: LoraProjection, x: torch.Tensor) -> _Step:
    base = projection.base
    if x.shape[-1] != base.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but the base layer expects "
            f"in_features={base.in_features}"
        )
    r = projection.lora_A.shape[0]
    if projection.lora_A.shape != (r, base.in_features) or projection.lora_B.shape != (
        base.out_features,
        r,
    ):
        raise ValueError(
            f"lora_A {tuple(projection.lora_A.shape)} / lora_B {tuple(projection.lora_B.shape)} "
            f"do not fit a base layer of in_features={base.in_features}, "
            f"out_features={base.out_features}; expected ({r}, {base.in_features}) and "
            f"({base.out_features}, {r})"
        )
    if not 0.0 <= projection.dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1], got {projection.dropout_p}")
    device_type = x.device.type
    amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    base_dtype = amp or base.compute_dtype(x.dtype)
    return _Step(
        base=base,
        scaling=float(projection.scaling),
        dropout_p=float(projection.dropout_p),
        base_dtype=base_dtype,
        lora_dtype=amp or projection.lora_A.dtype,
        out_dtype=x.dtype if base.output_in_input_dtype else base_dtype,
    )


def fused_lora_multi(
    x: torch.Tensor, projections: Sequence[LoraProjection]
) -> tuple[torch.Tensor, ...]:
    """Run several LoRA projections of the same input in one autograd Function.

    ``x`` is saved once and the input gradients of all projections are summed inside the
    backward. Dropout masks are drawn per projection, in the order given (the order PEFT
    would draw them when the projections are called one after the other).
    """
    if not projections:
        raise ValueError("projections is empty; pass at least one LoraProjection")
    steps = tuple(_make_step(p, x) for p in projections)
    params: list[torch.Tensor | None] = []
    for p in projections:
        params += [p.base.bias, p.lora_A, p.lora_B]
    return _FusedLoraFunction.apply(x, steps, *params)


def fused_lora_linear(
    x: torch.Tensor,
    base: nn.Module | FrozenWeight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``x @ W^T + b + scaling * (dropout(x) @ lora_A^T) @ lora_B^T`` with a fused backward.

    ``base`` is the frozen base layer (``nn.Linear``, bitsandbytes ``Linear4bit``, gptqmodel
    ``TorchLinear``/``TritonV2Linear``) or a ``FrozenWeight``. ``dropout_p`` is applied as given:
    pass 0.0 outside training.
    """
    weight = base if isinstance(base, FrozenWeight) else frozen_weight(base)
    (y,) = fused_lora_multi(x, [LoraProjection(weight, lora_A, lora_B, scaling, dropout_p)])
    return y


def fused_lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The unfused LoRA linear (autograd differentiates it): ``x @ W^T + b + scaling *
    ((x * mask / (1 - p)) @ A^T) @ B^T`` with a dense ``weight``; the oracle of the Function."""
    x_lora = x if dropout_mask is None else x * dropout_mask * _dropout_scale(dropout_p)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_A), lora_B)

"""RMSNorm: Triton kernels, the PyTorch reference, an autograd Function and the public op.

``y = normed(x) * (offset + weight)`` with ``normed(x) = x / sqrt(mean(x**2) + eps)`` over the
last dimension. Three casting modes say where half-precision rounding happens (they are the
families transformers' RMSNorm copies fall into, and Liger's ``casting_mode`` values):

* ``"llama"``: normalise in fp32, round to the input dtype, *then* multiply by the weight; the
  result has the promoted dtype of weight and input (Llama, Mistral, Qwen, Granite, Phi3, ...).
* ``"gemma"``: multiply by ``offset + weight`` in fp32 and round once, to the input dtype
  (Gemma with ``offset=1``, which stores the weight as a delta from 1; OLMo2, GPT-OSS with 0).
* ``"none"``: no casts: the reference computes everything in the input dtype; the Triton
  kernel computes in fp32 and rounds once on store (dtype: promoted of weight and input).

``weight=None`` is an RMSNorm without a learned scale (``elementwise_affine=False``).
``in_place=True`` writes the input gradient into the output-gradient buffer (one activation-size
buffer less in backward); only safe when nothing else reads that gradient tensor afterwards,
so it is off by default.

The autograd Function's backward is written by hand, so only ``x`` and the per-row ``rstd``
are kept for backward instead of the fp32 intermediates autograd would save. Which module
computes which mode is model glue: ``accel_fused_ops.integration.norms``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import as_rows, pick_impl

CASTINGS = ("llama", "gemma", "none")
_CASTING_IDS = {name: i for i, name in enumerate(CASTINGS)}
# Largest normalised dimension one program holds in registers.
_MAX_BLOCK_D = 65536
# Elements per program tile: several short rows share a program, long rows get one each.
_TILE_ELEMS = 4096
_MAX_ROWS_PER_TILE = 16


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    eps,
    offset,
    CASTING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    y = x * rstd[:, None]
    if CASTING == 0:
        # Llama rounds the normalised value to the input dtype before the weight multiply.
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        y = y * w[None, :]
    tl.store(
        y_ptr + rows64[:, None] * y_row_stride + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    x_row_stride,
    dx_row_stride,
    offset,
    CASTING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Each program walks a strided set of row tiles and keeps one fp32 partial sum of the
    # weight gradient; the partials are reduced on the host side (one small torch.sum).
    # dx may alias dy (in-place backward): every element is loaded before it is stored.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for start in range(pid * BLOCK_M, n_rows, n_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(
            dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]

        if COMPUTE_DW:
            if CASTING == 0:
                rounded = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
                dw_acc += tl.sum(dy * rounded, axis=0)
            else:
                dw_acc += tl.sum(dy * normed, axis=0)

        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), g = dL/d(normed).
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        mean_gn = tl.sum(g * normed, axis=1) / n_cols
        dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask,
        )

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """Return (BLOCK_M, BLOCK_D, num_warps) for rows of ``n_cols`` elements."""
    block_d = triton.next_power_of_2(n_cols)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(
            f"rms_norm: the last dimension ({n_cols}) is larger than the Triton kernel supports "
            f"({_MAX_BLOCK_D}); set ACCEL_KERNEL_IMPL=torch to use the PyTorch path"
        )
    block_m = max(1, min(_MAX_ROWS_PER_TILE, _TILE_ELEMS // block_d))
    num_warps = min(16, max(1, block_m * block_d // 512))
    return block_m, block_d, num_warps


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # Triton interpreter: every program instance costs real time


def _output_dtype(x: torch.Tensor, weight: torch.Tensor | None, casting: str) -> torch.dtype:
    if casting == "gemma" or weight is None:
        return x.dtype
    return torch.promote_types(weight.dtype, x.dtype)


def _triton_forward(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=_output_dtype(x2d, weight, casting), device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block_m, block_d, num_warps = _launch_config(n_cols)
    if n_rows == 0:
        return y, rstd
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x2d,
        x2d if weight is None else weight,  # never read without a weight
        y,
        rstd,
        n_rows,
        n_cols,
        x2d.stride(0),
        y.stride(0),
        float(eps),
        float(offset),
        CASTING=_CASTING_IDS[casting],
        HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, rstd


def _triton_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    compute_dw: bool,
    dx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x2d.shape
    block_m, block_d, num_warps = _launch_config(n_cols)
    n_programs = max(1, min(triton.cdiv(n_rows, block_m), _max_programs(x2d.device)))
    if dx is None:
        dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    dw_partial = torch.zeros(
        (n_programs if compute_dw else 1, n_cols), dtype=torch.float32, device=x2d.device
    )
    if n_rows > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2d,
            x2d,
            x2d if weight is None else weight,
            rstd,
            dx,
            dw_partial,
            n_rows,
            n_cols,
            dy2d.stride(0),
            x2d.stride(0),
            dx.stride(0),
            float(offset),
            CASTING=_CASTING_IDS[casting],
            HAS_WEIGHT=weight is not None,
            COMPUTE_DW=compute_dw,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# --------------------------------------------------------------------------- PyTorch path


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
) -> torch.Tensor:
    """Plain PyTorch RMSNorm (differentiable by autograd), written as the transformers modules
    of each casting mode write it; the CPU forward and the oracle of the kernels."""
    if casting == "none":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if weight is None else y * (offset + weight)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(x.dtype)
    if casting == "llama":
        if offset == 0.0:
            return weight * normed.to(x.dtype)  # literally the transformers expression
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        return ((offset + weight.float()) * normed.to(x.dtype)).to(out_dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def _torch_forward(
    x2d: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    y = rms_norm_reference(x2d, weight, eps, offset=offset, casting=casting)
    rstd = torch.rsqrt(x2d.float().pow(2).mean(-1) + eps)
    return y, rstd


def _torch_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    compute_dw: bool,
    dx_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rstd = rstd.unsqueeze(-1)
    normed = x2d.float() * rstd
    dyf = dy2d.float()
    dw = None
    if compute_dw:
        scaled = normed.to(x2d.dtype).float() if casting == "llama" else normed
        dw = (dyf * scaled).sum(0).to(weight.dtype)
    g = dyf if weight is None else dyf * (offset + weight.float())
    dx = ((g - normed * (g * normed).mean(-1, keepdim=True)) * rstd).to(x2d.dtype)
    if dx_out is not None:
        return dx_out.copy_(dx), dw
    return dx, dw


# --------------------------------------------------------------------------- autograd + API


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension; backward recomputes ``normed`` from ``x`` and ``rstd``."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting, in_place, impl):
        shape = x.shape
        x2d = as_rows(x)
        if weight is not None:
            weight = weight.contiguous()  # the kernels index it with unit stride
        forward = _triton_forward if impl == "triton" else _torch_forward
        y, rstd = forward(x2d, weight, eps, offset, casting)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.casting, ctx.impl, ctx.shape = offset, casting, impl, shape
        ctx.in_place = in_place
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = as_rows(dy)
        # in place only into a buffer of our own shape and dtype that is not a broadcast view
        reuse = ctx.in_place and dy.is_contiguous() and dy.dtype == x2d.dtype
        backward = _triton_backward if ctx.impl == "triton" else _torch_backward
        compute_dw = weight is not None and ctx.needs_input_grad[1]
        dx, dw = backward(
            dy2d, x2d, weight, rstd, ctx.offset, ctx.casting, compute_dw, dy2d if reuse else None
        )
        return dx.view(ctx.shape), dw, None, None, None, None, None


def _check_args(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: str
) -> None:
    if casting not in CASTINGS:
        raise ValueError(f"rms_norm: casting={casting!r} is not valid; expected one of {CASTINGS}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("rms_norm: x must be a tensor with at least one dimension (..., D)")
    if weight is None:
        if offset != 0.0:
            raise ValueError(
                f"rms_norm: offset={offset} needs a weight (the scale is offset + weight); "
                "pass the weight or offset=0.0"
            )
    elif not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match the last dimension of "
            f"x {tuple(x.shape)}, got {got}"
        )
    elif weight.device != x.device:
        raise ValueError(
            f"rms_norm: x is on {x.device} but weight is on {weight.device}; move them together"
        )
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be a non-negative number, got {eps!r}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
    in_place: bool = False,
) -> torch.Tensor:
    """RMSNorm of ``x`` (..., D) scaled by ``offset + weight`` (D,), or unscaled (``None``).

    ``casting`` is ``"llama"``, ``"gemma"`` or ``"none"`` (module docstring); ``in_place``
    reuses the output-gradient buffer for the input gradient. Runs the Triton kernel on CUDA
    tensors and PyTorch elsewhere (``ACCEL_KERNEL_IMPL`` overrides). Differentiable in ``x``
    and ``weight``.
    """
    _check_args(x, weight, eps, offset, casting)
    impl = pick_impl(x, weight)
    return RMSNormFunction.apply(
        x, weight, float(eps), float(offset), casting, bool(in_place), impl
    )

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

The Triton path has two shapes of kernel, chosen per pass by :func:`_launch_config`:

* **row in registers** (rows up to :data:`_FWD_MAX_COLS` columns forward and
  :data:`_BWD_MAX_COLS` backward, by element size): one program holds whole rows, reads each
  input once, and backward keeps one fp32 weight-gradient partial per program;
* **column-looped** (wider rows, any width): programs walk the row in ``BLOCK_D``-column
  chunks. Forward makes two passes over the row (the sum of squares, then the scaled store;
  the second read mostly hits L2). Backward first reduces ``mean(g * normed)`` per row, then a
  2-D grid of (row group, column block) programs writes ``dx`` and a weight-gradient partial
  per row group, so no program ever holds a whole row.

Every launch holds ptxas to the registers that let two blocks share an SM
(``Launch.maxnreg``); the limits are the widest rows whose kernels compile without spills
under that cap for sm_80 and sm_90 (``benchmarks/gpu/compile_check.py`` checks both). Any
width works: there is no largest row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import as_rows, pick_impl

CASTINGS = ("llama", "gemma", "none")
_CASTING_IDS = {name: i for i, name in enumerate(CASTINGS)}
# Widest row one program holds in registers, per pass and by bytes per element of the inputs
# (x; backward: the wider of x and dy); wider rows take the column-looped kernels. These are
# the widths whose kernels compile without spills under the two-blocks-per-SM register cap
# (Launch.maxnreg) for sm_80 and sm_90: forward keeps a row of x live; backward x, dy and the
# fp32 weight-gradient partial.
_FWD_MAX_COLS = {2: 16384, 4: 8192}
_BWD_MAX_COLS = {2: 8192, 4: 4096}
# Row-in-registers tiles: several short rows share a program, long rows get one each.
_TILE_ELEMS = 4096
_MAX_ROWS_PER_TILE = 16
# Column-looped tiles: BLOCK_M rows x BLOCK_D columns per step.
_WIDE_BLOCK_M = 4
_WIDE_BLOCK_D = 1024
_WIDE_WARPS = 4
# Every NVIDIA GPU since Volta: 64K registers per SM, at most 255 per thread.
_REGISTERS_PER_SM = 65536
_MAX_REGISTERS = 255


class Launch(NamedTuple):
    """How one pass of the op is launched for rows of a given width."""

    wide: bool  # column-looped kernels (rows wider than the register limit)
    block_m: int  # rows per program tile
    block_d: int  # columns per tile: the whole row (padded to a power of 2) unless wide
    num_warps: int

    @property
    def maxnreg(self) -> int:
        """Registers per thread that let two blocks share an SM's 64K registers: ptxas is
        held to it, so every launch keeps at least 2 blocks per SM (the compile check
        verifies that nothing spills under the cap)."""
        return min(_MAX_REGISTERS, _REGISTERS_PER_SM // (2 * 32 * self.num_warps))


def _launch_config(n_cols: int, *, backward: bool = False, itemsize: int = 2) -> Launch:
    """The launch of the forward (or backward) kernels for rows of ``n_cols`` elements whose
    inputs (x; backward: the wider of x and dy) take ``itemsize`` bytes per element. The op
    launches with it, and the compile check measures registers and spills with it."""
    limit = (_BWD_MAX_COLS if backward else _FWD_MAX_COLS)[2 if itemsize <= 2 else 4]
    if n_cols > limit:
        return Launch(True, _WIDE_BLOCK_M, _WIDE_BLOCK_D, _WIDE_WARPS)
    block_d = triton.next_power_of_2(n_cols)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, _TILE_ELEMS // block_d))
    num_warps = min(16, max(1, block_m * block_d // 512))
    return Launch(False, block_m, block_d, num_warps)


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _scale(
    normed, x_ptr, w_ptr, cols, col_mask, offset, CASTING: tl.constexpr, HAS_WEIGHT: tl.constexpr
):
    """``normed * (offset + w)`` in fp32, with Llama's rounding of ``normed`` first."""
    if CASTING == 0:
        # Llama rounds the normalised value to the input dtype before the weight multiply.
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        normed = normed * w[None, :]
    return normed


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
    """Row in registers: ``BLOCK_M`` whole rows per program."""
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
    y = _scale(x * rstd[:, None], x_ptr, w_ptr, cols, col_mask, offset, CASTING, HAS_WEIGHT)
    tl.store(
        y_ptr + rows64[:, None] * y_row_stride + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _rms_norm_fwd_wide_kernel(
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
    """Column-looped: ``BLOCK_M`` rows per program, two passes of ``BLOCK_D`` columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * x_row_stride
    y_rows = y_ptr + rows64[:, None] * y_row_stride

    sum_sq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_sq += x * x
    rstd = tl.rsqrt(tl.sum(sum_sq, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _scale(x * rstd[:, None], x_ptr, w_ptr, cols, col_mask, offset, CASTING, HAS_WEIGHT)
        tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dw_rows(dy, normed, x_ptr, CASTING: tl.constexpr):
    """A tile's weight-gradient contribution summed over its rows (Llama: the weight
    multiplied the normalised value rounded to the input dtype)."""
    if CASTING == 0:
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    return tl.sum(dy * normed, axis=0)


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
    """Row in registers: each program walks a strided set of row tiles and keeps one fp32
    partial sum of the weight gradient (the partials are reduced by one small torch.sum).
    dx may alias dy (in-place backward): every element is loaded before it is stored."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for start in range(pid * BLOCK_M, n_rows, n_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x.to(tl.float32) * rstd[:, None]
        if COMPUTE_DW:
            dw_acc += _dw_rows(dy, normed, x_ptr, CASTING)
        # g = dL/d(normed); the weight is re-read per tile (from L1) rather than held in
        # registers across the loop next to x, dy and the partial.
        g = _scale(dy, x_ptr, w_ptr, cols, col_mask, offset, 1, HAS_WEIGHT)
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)).
        mean_gn = tl.sum(g * normed, axis=1) / n_cols
        dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask,
        )

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


@triton.jit
def _rms_norm_bwd_rows_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    mean_gn_ptr,
    n_rows,
    n_cols,
    dy_row_stride,
    x_row_stride,
    offset,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Column-looped backward, first pass: ``mean(g * normed)`` of each row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
        g = _scale(dy.to(tl.float32), x_ptr, w_ptr, cols, col_mask, offset, 1, HAS_WEIGHT)
        acc += g * x.to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    tl.store(mean_gn_ptr + rows, tl.sum(acc, axis=1) * rstd / n_cols, mask=row_mask)


@triton.jit
def _rms_norm_bwd_wide_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    mean_gn_ptr,
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
    """Column-looped backward, second pass: program (g, c) writes ``dx`` of column block c
    for row tiles g, g + G, ... and the weight-gradient partial of row group g."""
    group = tl.program_id(0)
    n_groups = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(group * BLOCK_M, n_rows, n_groups * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        mean_gn = tl.load(mean_gn_ptr + rows, mask=row_mask, other=0.0)
        normed = x.to(tl.float32) * rstd[:, None]
        if COMPUTE_DW:
            dw_acc += _dw_rows(dy, normed, x_ptr, CASTING)
        g = _scale(dy, x_ptr, w_ptr, cols, col_mask, offset, 1, HAS_WEIGHT)
        dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows64[:, None] * dx_row_stride + cols[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask,
        )
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + group.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


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
    launch = _launch_config(n_cols, itemsize=x2d.element_size())
    if n_rows == 0:
        return y, rstd
    kernel = _rms_norm_fwd_wide_kernel if launch.wide else _rms_norm_fwd_kernel
    kernel[(triton.cdiv(n_rows, launch.block_m),)](
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
        BLOCK_M=launch.block_m,
        BLOCK_D=launch.block_d,
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
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
    itemsize = max(x2d.element_size(), dy2d.element_size())
    launch = _launch_config(n_cols, backward=True, itemsize=itemsize)
    row_tiles = triton.cdiv(n_rows, launch.block_m)
    col_blocks = triton.cdiv(n_cols, launch.block_d) if launch.wide else 1
    budget = max(1, _max_programs(x2d.device) // col_blocks)
    n_groups = max(1, min(row_tiles, budget))  # programs (row groups) along the rows
    if dx is None:
        dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    dw_partial = torch.zeros(
        (n_groups if compute_dw else 1, n_cols), dtype=torch.float32, device=x2d.device
    )
    w = x2d if weight is None else weight  # never read without a weight
    common = dict(
        CASTING=_CASTING_IDS[casting],
        HAS_WEIGHT=weight is not None,
        COMPUTE_DW=compute_dw,
        BLOCK_M=launch.block_m,
        BLOCK_D=launch.block_d,
        num_warps=launch.num_warps,
        maxnreg=launch.maxnreg,
    )
    if n_rows == 0:
        pass
    elif not launch.wide:
        _rms_norm_bwd_kernel[(n_groups,)](
            dy2d, x2d, w, rstd, dx, dw_partial, n_rows, n_cols,
            dy2d.stride(0), x2d.stride(0), dx.stride(0), float(offset), **common,
        )  # fmt: skip
    else:
        mean_gn = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
        _rms_norm_bwd_rows_kernel[(row_tiles,)](
            dy2d, x2d, w, rstd, mean_gn, n_rows, n_cols, dy2d.stride(0), x2d.stride(0),
            float(offset), HAS_WEIGHT=weight is not None, BLOCK_M=launch.block_m,
            BLOCK_D=launch.block_d, num_warps=launch.num_warps, maxnreg=launch.maxnreg,
        )  # fmt: skip
        _rms_norm_bwd_wide_kernel[(n_groups, col_blocks)](
            dy2d, x2d, w, rstd, mean_gn, dx, dw_partial, n_rows, n_cols,
            dy2d.stride(0), x2d.stride(0), dx.stride(0), float(offset), **common,
        )  # fmt: skip
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

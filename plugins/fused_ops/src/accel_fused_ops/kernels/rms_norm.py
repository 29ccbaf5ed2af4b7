"""RMSNorm with the exact rounding behaviour of the transformers modules it replaces.

Two families exist in transformers and they round differently in half precision:

* ``casting="llama"`` (Llama, Mistral, Mixtral, Qwen2/3, Granite, Phi3, ...): normalise in
  fp32, round to the input dtype, *then* multiply by the weight; the result has the promoted
  dtype of weight and input.
* ``casting="gemma"`` (Gemma 1/2/3 with ``offset=1``, Olmo2/3 with ``offset=0``): multiply by
  the weight in fp32 and round once, to the input dtype.

``offset`` is added to the weight before use (Gemma stores ``weight`` as a delta from 1).

The op comes in three parts: Triton kernels (GPU path, fp32 inside, cast on store), a
pure-PyTorch version (CPU path and test oracle) and an autograd Function whose backward is
written by hand, so that only ``x`` and the per-row ``rstd`` are kept for backward instead of
the fp32 intermediates autograd would save.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel_fused_ops.dispatch import choose_impl

CASTINGS = ("llama", "gemma")
# Dtypes the Triton path handles; anything else (e.g. fp64) takes the PyTorch path.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    GEMMA_CASTING: tl.constexpr,
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

    normed = x * rstd[:, None]
    if not GEMMA_CASTING:
        # Llama rounds the normalised value to the input dtype before the weight multiply.
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    y = normed * w[None, :]
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
    GEMMA_CASTING: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Each program walks a strided set of row tiles and keeps one fp32 partial sum of the
    # weight gradient; the partials are reduced on the host side (one small torch.sum).
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
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
            if GEMMA_CASTING:
                dw_acc += tl.sum(dy * normed, axis=0)
            else:
                rounded = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
                dw_acc += tl.sum(dy * rounded, axis=0)

        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), g = dL/d(normed).
        g = dy * w[None, :]
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


def _output_dtype(x: torch.Tensor, weight: torch.Tensor, casting: str) -> torch.dtype:
    if casting == "llama":
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def _triton_forward(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2d.shape
    y = torch.empty((n_rows, n_cols), dtype=_output_dtype(x2d, weight, casting), device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block_m, block_d, num_warps = _launch_config(n_cols)
    if n_rows == 0:
        return y, rstd
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x2d,
        weight,
        y,
        rstd,
        n_rows,
        n_cols,
        x2d.stride(0),
        y.stride(0),
        float(eps),
        float(offset),
        GEMMA_CASTING=casting == "gemma",
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, rstd


def _triton_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x2d.shape
    block_m, block_d, num_warps = _launch_config(n_cols)
    n_programs = max(1, min(triton.cdiv(n_rows, block_m), _max_programs(x2d.device)))
    dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
    dw_partial = torch.zeros(
        (n_programs if compute_dw else 1, n_cols), dtype=torch.float32, device=x2d.device
    )
    if n_rows == 0:
        return dx, (dw_partial.sum(0).to(weight.dtype) if compute_dw else None)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2d,
        x2d,
        weight,
        rstd,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        dy2d.stride(0),
        x2d.stride(0),
        dx.stride(0),
        float(offset),
        GEMMA_CASTING=casting == "gemma",
        COMPUTE_DW=compute_dw,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


# --------------------------------------------------------------------------- PyTorch path


def _apply_weight(
    normed: torch.Tensor,
    input_dtype: torch.dtype,
    weight: torch.Tensor,
    offset: float,
    casting: str,
) -> torch.Tensor:
    """Scale fp32 ``normed`` by ``offset + weight`` with the rounding of ``casting``."""
    if casting == "llama":
        out_dtype = torch.promote_types(weight.dtype, input_dtype)
        if offset == 0.0:
            return weight * normed.to(input_dtype)  # literally the transformers expression
        return ((offset + weight.float()) * normed.to(input_dtype)).to(out_dtype)
    return (normed * (offset + weight.float())).to(input_dtype)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
) -> torch.Tensor:
    """Plain PyTorch RMSNorm (differentiable by autograd); the oracle for the kernels."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return _apply_weight(normed, x.dtype, weight, offset, casting)


def _torch_forward(
    x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x2d.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = _apply_weight(xf * rstd, x2d.dtype, weight, offset, casting)
    return y, rstd.squeeze(-1)


def _torch_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rstd = rstd.unsqueeze(-1)
    normed = x2d.float() * rstd
    dyf = dy2d.float()
    dw = None
    if compute_dw:
        scaled = normed if casting == "gemma" else normed.to(x2d.dtype).float()
        dw = (dyf * scaled).sum(0).to(weight.dtype)
    g = dyf * (offset + weight.float())
    dx = (g - normed * (g * normed).mean(-1, keepdim=True)) * rstd
    return dx.to(x2d.dtype), dw


# --------------------------------------------------------------------------- autograd + API


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension; backward recomputes ``normed`` from ``x`` and ``rstd``."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting, impl):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        weight = weight.contiguous()  # the kernels index it with unit stride
        forward = _triton_forward if impl == "triton" else _torch_forward
        y, rstd = forward(x2d, weight, eps, offset, casting)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.casting, ctx.impl, ctx.shape = offset, casting, impl, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        backward = _triton_backward if ctx.impl == "triton" else _torch_backward
        dx, dw = backward(dy2d, x2d, weight, rstd, ctx.offset, ctx.casting, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None, None, None


def _check_args(x: torch.Tensor, weight: torch.Tensor, eps: float, casting: str) -> None:
    if casting not in CASTINGS:
        raise ValueError(f"rms_norm: casting={casting!r} is not valid; expected one of {CASTINGS}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("rms_norm: x must be a tensor with at least one dimension (..., D)")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match the last dimension of "
            f"x {tuple(x.shape)}, got {got}"
        )
    if weight.device != x.device:
        raise ValueError(
            f"rms_norm: x is on {x.device} but weight is on {weight.device}; move them together"
        )
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"rms_norm: eps must be a non-negative number, got {eps!r}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
) -> torch.Tensor:
    """RMSNorm of ``x`` (..., D) scaled by ``offset + weight`` (D,).

    Matches ``LlamaRMSNorm``-style modules with ``casting="llama", offset=0`` and
    ``Gemma2RMSNorm``-style ones with ``casting="gemma", offset=1`` (see ``rms_norm_params``).
    Runs the Triton kernel on CUDA tensors and PyTorch elsewhere (``ACCEL_KERNEL_IMPL``
    overrides). Differentiable in ``x`` and ``weight``.
    """
    _check_args(x, weight, eps, casting)
    impl = choose_impl(x)
    if impl == "triton" and (x.dtype not in _TRITON_DTYPES or weight.dtype not in _TRITON_DTYPES):
        impl = "torch"
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting, impl)


# --------------------------------------------------------------------------- module lookup

# Classes whose forward is, line for line, LlamaRMSNorm's (eps in ``variance_epsilon``).
_LLAMA_STYLE = frozenset(
    {
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "MinistralRMSNorm",
        "MixtralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen2MoeRMSNorm",
        "Qwen3RMSNorm",
        "Qwen3MoeRMSNorm",
        "GraniteRMSNorm",
        "GraniteMoeRMSNorm",
        "GraniteMoeSharedRMSNorm",
        "GraniteMoeHybridRMSNorm",
        "Phi3RMSNorm",
        "DeepseekV3RMSNorm",
        "SmolLM3RMSNorm",
    }
)
# ``output * (1 + weight.float())`` then cast (eps in ``eps``).
_GEMMA_STYLE = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
# ``(weight * normed_fp32).to(input_dtype)`` (eps in ``variance_epsilon``).
_OLMO_STYLE = frozenset({"Olmo2RMSNorm", "Olmo3RMSNorm"})


def rms_norm_params(module: torch.nn.Module) -> dict:
    """Keyword arguments that make ``rms_norm(x, module.weight, **kw)`` equal ``module(x)``.

    The module is recognised by its class name (or a base class's), because transformers
    copies RMSNorm into every model file and the copies differ in eps attribute name and in
    rounding. Returns ``{"eps": float, "offset": float, "casting": str}``.
    """
    for cls in type(module).__mro__:
        name = cls.__name__
        if name in _LLAMA_STYLE:
            return {"eps": float(module.variance_epsilon), "offset": 0.0, "casting": "llama"}
        if name in _GEMMA_STYLE:
            return {"eps": float(module.eps), "offset": 1.0, "casting": "gemma"}
        if name in _OLMO_STYLE:
            return {"eps": float(module.variance_epsilon), "offset": 0.0, "casting": "gemma"}
    known = sorted(_LLAMA_STYLE | _GEMMA_STYLE | _OLMO_STYLE)
    raise ValueError(
        f"rms_norm_params: no fused RMSNorm equivalent is known for {type(module).__name__}; "
        f"known classes are {', '.join(known)}. Leave this module unpatched, or add its class "
        "to the table in accel_fused_ops.kernels.rms_norm after checking that its forward "
        "matches one of the listed families."
    )

"""Grouped GEMM over scattered rows: ``y[scatter[r]] = x[gather[r]] @ W[e(r)]``.

The routing is sorted once per MoE block (:class:`Routing`): row ``r`` of the sorted order
belongs to expert ``e(r)``, reads input row ``gather[r]`` (the token) and writes output row
``scatter[r]`` (the token-expert slot). The gather and the scatter are part of the GEMM, so
the token copies that a plain grouped GEMM needs (``x[perm]`` before, ``y[inv_perm]`` after)
are never materialised on CUDA.

Three parts, like the other kernel modules of accel:

- Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``): one grouped GEMM with
  optional fused gather and scatter (forward and input gradient) and one weight-gradient
  kernel that gathers both operands; fp32 accumulation, inputs of any float dtype.
- A PyTorch path (CPU): the same op with ``torch._grouped_mm`` (a native grouped GEMM), and a
  padded batched GEMM when the shapes break its 16-byte stride rule; no loop over experts.
- :class:`ScatteredLinear`, the autograd Function both share. The weight gradient is written
  in the weight's own layout (transformers stores ``(E, out, in)``), so no transposed copy is
  made, and the gathered input is recomputed in backward instead of being saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from accel.api import choose_impl as shared_choose_impl
from accel.api import triton_interpreting


def choose_impl(tensor: torch.Tensor) -> str:
    """``"triton"`` on CUDA tensors, ``"torch"`` elsewhere; ``ACCEL_KERNEL_IMPL`` forces one
    (``triton`` on CPU tensors only under the Triton interpreter)."""
    return shared_choose_impl(tensor, "accel_moe")


# --------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """The sorted routing of one MoE block (rows of experts ``>= num_experts`` dropped).

    ``experts[r]``: expert of sorted row ``r``; ``tokens[r]``: its input row; ``slots[r]``: its
    token-expert slot (``token * top_k + j``); ``ends[e]``: one past expert ``e``'s last row.
    """

    experts: torch.Tensor
    tokens: torch.Tensor
    slots: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor
    num_experts: int
    num_slots: int
    _blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def sort(cls, top_k_index: torch.Tensor, num_experts: int) -> Routing:
        """Sort the routing indices once. Ids ``>= num_experts`` (experts of other ranks under
        expert parallelism) sort to the tail and are cut off, so they cost nothing."""
        top_k = top_k_index.size(-1)
        ids = top_k_index.reshape(-1)
        sorted_ids, slots = torch.sort(ids, stable=True)
        counts = torch.bincount(ids.clamp(max=num_experts), minlength=num_experts + 1)
        counts = counts[:num_experts]
        ends = torch.cumsum(counts, 0)
        rows = int(ends[-1]) if num_experts else 0
        slots = slots[:rows]
        return cls(
            experts=sorted_ids[:rows],
            tokens=torch.div(slots, top_k, rounding_mode="floor"),
            slots=slots,
            counts=counts,
            ends=ends,
            num_experts=num_experts,
            num_slots=ids.numel(),
        )

    @property
    def rows(self) -> int:
        return self.slots.numel()

    def blocks(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the Triton grid: the expert and the first row of each ``block_m``-row block
        (every block lies inside one expert's rows)."""
        if self._blocks is None:
            self._blocks = {}
        if block_m not in self._blocks:
            per_expert = torch.div(self.counts + block_m - 1, block_m, rounding_mode="floor")
            expert_of_block = torch.repeat_interleave(
                torch.arange(self.num_experts, device=self.counts.device), per_expert
            )
            first_block = torch.cumsum(per_expert, 0) - per_expert
            starts = self.ends - self.counts
            index = torch.arange(expert_of_block.numel(), device=self.counts.device)
            row0 = starts[expert_of_block] + (index - first_block[expert_of_block]) * block_m
            self._blocks[block_m] = (expert_of_block.to(torch.int32), row0.to(torch.int32))
        return self._blocks[block_m]


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _grouped_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    gather_ptr,
    scatter_ptr,
    block_expert_ptr,
    block_row_ptr,
    ends_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ym,
    stride_yn,
    HAS_GATHER: tl.constexpr,
    HAS_SCATTER: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M rows of one expert) x (BLOCK_N columns) tile of ``y = x[gather] @ W[e]``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    row0 = tl.load(block_row_ptr + pid_m)
    end = tl.load(ends_ptr + expert)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if HAS_GATHER:
        src = tl.load(gather_ptr + rows, mask=row_mask, other=0)
    else:
        src = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(
            x_ptr + src.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if IEEE:  # fp32 inputs (and every dtype in the interpreter): exact fp32 products
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:  # bf16/fp16 on the GPU: tensor cores, fp32 accumulation
            acc += tl.dot(a, b)
    if HAS_SCATTER:
        dst = tl.load(scatter_ptr + rows, mask=row_mask, other=0)
    else:
        dst = rows
    tl.store(
        y_ptr + dst.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    x_rows_ptr,
    dy_rows_ptr,
    ends_ptr,
    counts_ptr,
    K,
    N,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_de,
    stride_dk,
    stride_dn,
    HAS_X_ROWS: tl.constexpr,
    HAS_DY_ROWS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_K x BLOCK_N) tile of ``dW[e] = x[x_rows]^T @ dy[dy_rows]`` over e's rows."""
    expert = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    end = tl.load(ends_ptr + expert)
    start = end - tl.load(counts_ptr + expert)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    col_mask = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if HAS_X_ROWS:
            xr = tl.load(x_rows_ptr + rows, mask=row_mask, other=0)
        else:
            xr = rows
        if HAS_DY_ROWS:
            dr = tl.load(dy_rows_ptr + rows, mask=row_mask, other=0)
        else:
            dr = rows
        a = tl.load(
            x_ptr + xr.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            dy_ptr + dr.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    tl.store(
        dw_ptr
        + expert.to(tl.int64) * stride_de
        + ks[:, None] * stride_dk
        + cols[None, :] * stride_dn,
        acc.to(dw_ptr.dtype.element_ty),
        mask=k_mask[:, None] & col_mask[None, :],
    )


class Tile(NamedTuple):
    """A launch of the GEMM kernels: the output tile (``block_m`` x ``block_n``), the step
    along the reduction (``block_k``), warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Candidate tiles per target family, largest first. bf16/fp16 run on tensor cores: Hopper
# takes a 64-deep reduction step (wgmma), Ampere/Ada a 32-deep one with one stage more; fp32
# (exact products, no TF32) runs on the FMA units with one modest tile. The compile check
# compiles every candidate for every target.
_TENSOR_CORE_TILES = {
    "hopper": (
        Tile(128, 128, 64, 8, 3),
        Tile(128, 64, 64, 4, 3),
        Tile(64, 128, 64, 4, 3),
        Tile(64, 64, 64, 4, 4),
    ),
    "ampere": (
        Tile(128, 128, 32, 8, 3),
        Tile(128, 64, 32, 4, 4),
        Tile(64, 128, 32, 4, 4),
        Tile(64, 64, 32, 4, 4),
    ),
}
_FP32_TILES = (Tile(64, 64, 32, 4, 3),)
# The interpreter costs per program instance: few, small tiles.
INTERPRETER_TILE = Tile(16, 16, 16, 4, 1)


def tile_candidates(capability: tuple[int, int], dtype: torch.dtype) -> tuple[Tile, ...]:
    """The tiles the op may launch on a GPU of compute ``capability`` for ``dtype`` inputs."""
    if dtype == torch.float32:
        return _FP32_TILES
    return _TENSOR_CORE_TILES["hopper" if capability >= (9, 0) else "ampere"]


def choose_tile(
    capability: tuple[int, int], dtype: torch.dtype, out_rows: int, out_cols: int
) -> Tile:
    """The candidate for an output of ``out_rows`` x ``out_cols`` per expert: the largest
    tile unless a side is shorter than 128, where a 128-wide side would mostly be padding."""
    for tile in tile_candidates(capability, dtype):
        if (tile.block_m <= 64 or out_rows >= 128) and (tile.block_n <= 64 or out_cols >= 128):
            return tile
    return tile_candidates(capability, dtype)[-1]


def _tile_for(x: torch.Tensor, out_rows: int, out_cols: int) -> Tile:
    if triton_interpreting() or not x.is_cuda:
        return INTERPRETER_TILE
    capability = torch.cuda.get_device_capability(x.device)
    return choose_tile(capability, x.dtype, out_rows, out_cols)


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or triton_interpreting()


def triton_grouped_gemm(
    x: torch.Tensor,
    w_kn: torch.Tensor,
    routing: Routing,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    out_rows: int,
) -> torch.Tensor:
    """``y[scatter[r]] = x[gather[r]] @ w_kn[e(r)]`` with ``w_kn`` any ``(E, K, N)`` view."""
    k, n = w_kn.shape[1], w_kn.shape[2]
    tile = _tile_for(x, routing.rows // max(1, routing.num_experts), n)
    bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
    covered = scatter is None or routing.rows == out_rows  # every output row gets written
    make = torch.empty if covered else torch.zeros
    y = make(out_rows, n, device=x.device, dtype=x.dtype)
    block_expert, block_row = routing.blocks(bm)
    if block_expert.numel() == 0 or n == 0:
        return y
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    _grouped_gemm_kernel[grid](
        x,
        w_kn,
        y,
        gather if gather is not None else block_row,
        scatter if scatter is not None else block_row,
        block_expert,
        block_row,
        routing.ends,
        k,
        n,
        x.stride(0),
        x.stride(1),
        w_kn.stride(0),
        w_kn.stride(1),
        w_kn.stride(2),
        y.stride(0),
        y.stride(1),
        HAS_GATHER=gather is not None,
        HAS_SCATTER=scatter is not None,
        IEEE=_ieee(x),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return y


def triton_grouped_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    routing: Routing,
    x_rows: torch.Tensor | None,
    dy_rows: torch.Tensor | None,
    dw_kn: torch.Tensor,
) -> torch.Tensor:
    """Fill ``dw_kn[e] = x[x_rows]^T @ dy[dy_rows]`` over expert ``e``'s rows (a view of any
    layout, so the gradient lands in the parameter's own storage order)."""
    e, k, n = dw_kn.shape
    # the output tile is (k, n) of one expert's weight; the rows are the reduction
    tile = _tile_for(x, k, n)
    bk, bn, bm = tile.block_m, tile.block_n, tile.block_k
    if e == 0 or k == 0 or n == 0:
        return dw_kn
    grid = (e, triton.cdiv(k, bk), triton.cdiv(n, bn))
    dummy = routing.ends
    _grouped_wgrad_kernel[grid](
        x,
        dy,
        dw_kn,
        x_rows if x_rows is not None else dummy,
        dy_rows if dy_rows is not None else dummy,
        routing.ends,
        routing.counts,
        k,
        n,
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        dw_kn.stride(0),
        dw_kn.stride(1),
        dw_kn.stride(2),
        HAS_X_ROWS=x_rows is not None,
        HAS_DY_ROWS=dy_rows is not None,
        IEEE=_ieee(x),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return dw_kn


# --------------------------------------------------------------------------- PyTorch path


def _aligned(*tensors: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s rule: 16-byte aligned data and strides (of the non-unit dims)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16:
            return False
        for dim, stride in zip(t.shape, t.stride()):
            if dim > 1 and stride != 1 and (stride * size) % 16:
                return False
    return True


def _padded(rows: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expert-major padding of sorted rows: ``(flat index into (E*C), C)``."""
    capacity = int(routing.counts.max()) if routing.rows else 0
    starts = routing.ends - routing.counts
    position = torch.arange(routing.rows, device=rows.device) - starts[routing.experts]
    return routing.experts * capacity + position, rows, capacity


def torch_grouped_mm(a: torch.Tensor, b_kn: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``out[r] = a[r] @ b_kn[e(r)]`` for sorted rows ``a`` (no gather, no scatter)."""
    if a.dtype != b_kn.dtype:
        a = a.to(b_kn.dtype)
    if routing.rows == 0:
        return a.new_zeros(0, b_kn.shape[2])
    if _aligned(a, b_kn):
        return torch._grouped_mm(a, b_kn, offs=routing.ends.to(torch.int32))
    flat, _, capacity = _padded(a, routing)
    padded = a.new_zeros(routing.num_experts * capacity, a.shape[1])
    padded[flat] = a
    out = torch.bmm(padded.view(routing.num_experts, capacity, -1), b_kn)
    return out.reshape(routing.num_experts * capacity, -1)[flat]


def torch_grouped_outer(a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """``out[e] = a[rows of e]^T @ b[rows of e]``, shape ``(E, a.shape[1], b.shape[1])``."""
    if _aligned(a, b) and routing.rows:
        return torch._grouped_mm(a.t(), b, offs=routing.ends.to(torch.int32))
    flat, _, capacity = _padded(a, routing)
    e = routing.num_experts
    pa = a.new_zeros(e * capacity, a.shape[1])
    pb = b.new_zeros(e * capacity, b.shape[1])
    if routing.rows:
        pa[flat] = a
        pb[flat] = b
    return torch.bmm(pa.view(e, capacity, -1).transpose(1, 2), pb.view(e, capacity, -1))


# --------------------------------------------------------------------------- autograd


def _kn(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as ``(E, in, out)``: transformers stores ``(E, out, in)`` unless transposed."""
    return weight if transposed else weight.transpose(-2, -1)


class ScatteredLinear(torch.autograd.Function):
    """``y[scatter[r]] = x[gather[r]] @ W[e(r)]`` with a hand-written backward.

    ``gather``/``scatter`` may be ``None`` (rows already in sorted order / output kept in
    sorted order). ``out_rows`` is the number of output rows when scattering (the slots; rows
    of other ranks' experts stay zero)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        routing: Routing,
        gather: torch.Tensor | None,
        scatter: torch.Tensor | None,
        out_rows: int,
        transposed: bool,
    ) -> torch.Tensor:
        impl = choose_impl(x)
        w_kn = _kn(weight, transposed)
        if impl == "triton":
            y = triton_grouped_gemm(x, w_kn, routing, gather, scatter, out_rows)
        else:
            rows = x.index_select(0, gather) if gather is not None else x
            y = torch_grouped_mm(rows, w_kn, routing).to(x.dtype)
            if scatter is not None:  # slots of other ranks' experts (never written) stay zero
                make = torch.empty if routing.rows == out_rows else torch.zeros
                out = make(out_rows, y.shape[1], dtype=y.dtype, device=y.device)
                y = out.index_copy_(0, scatter, y)
        ctx.save_for_backward(x, weight)
        ctx.routing, ctx.gather, ctx.scatter = routing, gather, scatter
        ctx.transposed, ctx.impl = transposed, impl
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        routing, gather, scatter = ctx.routing, ctx.gather, ctx.scatter
        dy = dy.contiguous()
        w_kn = _kn(weight, ctx.transposed)
        dx = dw = None
        if ctx.impl == "triton":
            if ctx.needs_input_grad[0]:
                dxs = triton_grouped_gemm(
                    dy, w_kn.transpose(-2, -1), routing, scatter, None, routing.rows
                )
                dx = _gathered_grad(dxs, gather, x)
            if ctx.needs_input_grad[1]:
                dw = torch.empty_like(weight)
                triton_grouped_wgrad(x, dy, routing, gather, scatter, _kn(dw, ctx.transposed))
        else:
            dys = dy.index_select(0, scatter) if scatter is not None else dy
            if ctx.needs_input_grad[0]:
                dxs = torch_grouped_mm(dys, w_kn.transpose(-2, -1), routing)
                dx = _gathered_grad(dxs, gather, x)
            if ctx.needs_input_grad[1]:
                rows = x.index_select(0, gather) if gather is not None else x
                rows = rows.to(weight.dtype)
                dys = dys.to(weight.dtype)
                if ctx.transposed:  # stored (E, in, out)
                    dw = torch_grouped_outer(rows, dys, routing)
                else:  # stored (E, out, in): dW[e] = dy_e^T x_e, already in that layout
                    dw = torch_grouped_outer(dys, rows, routing)
        return dx, dw, None, None, None, None, None


def _gathered_grad(dxs: torch.Tensor, gather: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Sum the sorted rows' gradients back onto the input rows they were gathered from (fp32
    accumulation, as a token's top-k rows meet here)."""
    if gather is None:
        return dxs.to(x.dtype)
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dx = torch.zeros(x.shape, device=x.device, dtype=wide)
    dx.index_add_(0, gather, dxs.to(wide))
    return dx.to(x.dtype)


def scattered_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    out_rows: int | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """The op; ``weight`` is ``(E, out, in)`` (``(E, in, out)`` when ``transposed``)."""
    rows = out_rows if out_rows is not None else routing.rows
    return ScatteredLinear.apply(x, weight, routing, gather, scatter, rows, transposed)


def reference_scattered_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
    out_rows: int | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """Test oracle: plain indexing and per-row batched matmul, autograd does the rest."""
    rows = x[gather] if gather is not None else x
    w = _kn(weight, transposed)[routing.experts]  # (R, in, out)
    y = torch.bmm(rows.unsqueeze(1).to(w.dtype), w).squeeze(1).to(x.dtype)
    if scatter is None:
        return y
    out = y.new_zeros(out_rows if out_rows is not None else routing.rows, y.shape[1])
    return out.index_copy(0, scatter, y)

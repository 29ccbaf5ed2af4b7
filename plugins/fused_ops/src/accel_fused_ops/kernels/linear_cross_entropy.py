"""Fused lm_head + cross-entropy: the loss of ``hidden @ weight.T + bias`` in token chunks.

The full ``(N, V)`` logits (and their fp32 upcast and gradient) never exist: tokens are taken
``chunk_size`` rows at a time; each chunk's logits are computed, turned in place into their
loss gradient by :func:`~accel_fused_ops.kernels.cross_entropy.cross_entropy_rows` (Triton
kernel on CUDA, PyTorch elsewhere), and immediately pushed through the projection's backward
to give the chunk's gradients for ``hidden``, ``weight`` and ``bias``. Backward then only
scales these stored gradients by ``grad_output``. Peak extra memory is one chunk of logits
plus the gradients themselves.

A frozen head (neither weight nor bias needs a gradient: LoRA, QLoRA) on the PyTorch path
without a soft-cap takes a faster route, :mod:`.linear_cross_entropy_online`: thousands of rows
at a time stream the vocabulary once in small blocks, flash-attention style, so the GEMMs run
at full size while only one block of logits (32 MiB by default) is alive.

Rows whose label is ``ignore_index`` are dropped before any matmul (prompt tokens in
completion-only training cost nothing); this needs one host sync per call.

Two entry points:

* :func:`fused_linear_cross_entropy` for a plain weight/bias (frozen, trainable or tied to
  the input embedding);
* :func:`fused_linear_cross_entropy_module` for any row-wise projection module, e.g. a PEFT
  LoRA-wrapped ``lm_head``: each chunk runs the module under autograd and
  ``torch.autograd.grad`` gives the chunk's gradients for the hidden states and the module's
  trainable parameters.

``reduction="none"`` needs a per-row ``grad_output`` that exists only in backward, so that
mode stores nothing in forward and recomputes the chunks in backward (replaying the RNG and
autocast state, so dropout masks match).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..dispatch import choose_impl
from .cross_entropy import (
    LossOutput,
    RowLosses,
    RowOptions,
    check_label_range,
    cross_entropy_rows,
    loss_scale,
    reduce_rows,
    z_loss_scale,
)
from .cross_entropy import validate_loss_args as _validate_loss_args
from .linear_cross_entropy_online import (
    Workspace,
    logit_bytes,
    online_plan,
    online_rows,
    weighted_row_sum,
)

__all__ = [
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_module",
]

# How many rows a chunk needs for the two matmuls to run at full speed, and the most memory
# one chunk of logits may take by default. CPU GEMMs against a 2048 x 128k head lose ~15% of
# their throughput at 256 rows and ~35% at 64 (measured), GPUs reach it with a few hundred
# rows. The chunk is the smaller of the two: at V=32k a CPU chunk is 512 rows (64 MiB fp32),
# not the 2048 rows a fixed 256 MiB would give. A ``memory_budget`` replaces both.
_SPEED_ROWS = {"cuda": 256, "cpu": 512}
_DEFAULT_BUDGET = {"cuda": 64 << 20, "cpu": 256 << 20}


def default_chunk_size(
    vocab_size: int,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    n_rows: int | None = None,
) -> int:
    """Rows per chunk: as many as the matmuls need to be fast, within a memory budget.

    ``memory_budget`` (bytes) bounds the chunk's vocabulary-sized buffers: its logits in
    ``dtype`` plus, for logits narrower than fp32, the fp32 block the cross-entropy works in.
    Given, it alone decides (``memory_budget=8 << 20`` at V=128k fp32 gives 16-row chunks); by
    default the chunk is the rows the device needs for full matmul speed, capped at 256 MiB
    (CPU) or 64 MiB (CUDA). Never more than ``n_rows`` when that is given.
    """
    device_type = torch.device(device).type
    item = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(int(vocab_size), 1) * (item + (4 if item < 4 else 0))
    if memory_budget is not None:
        rows = memory_budget // row_bytes
    else:
        budget = _DEFAULT_BUDGET.get(device_type, _DEFAULT_BUDGET["cuda"])
        rows = min(_SPEED_ROWS.get(device_type, _SPEED_ROWS["cuda"]), budget // row_bytes)
    if n_rows is not None:
        rows = min(rows, n_rows)
    return max(1, int(rows))


@dataclass(frozen=True)
class _Options:
    impl: str
    rows: RowOptions
    reduction: str
    chunk_size: int
    #: (rows per pass, vocabulary block) when the frozen-head streaming pass is used
    online: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------
# Projections: how one chunk's logits are computed and back-propagated
# --------------------------------------------------------------------------------------------


class _LinearProjection:
    """``h @ weight.T + bias`` in ``compute_dtype``, backward written out as two matmuls.

    The chunk's logits are computed into one buffer reused by every chunk (no fresh
    vocabulary-sized allocation, hence no page faults, per chunk). The weight gradient
    accumulates in ``accum_dtype`` (default ``compute_dtype``; fp32 for a bf16 head multiplies
    the chunk in fp32, at the cost of an fp32 copy of the chunk's logits gradient and an fp32
    matmul, and rounds once at the end instead of once per chunk), the bias gradient in fp32;
    both are cast to the parameters' dtypes at the end.
    """

    owns_logits = True  # the logits buffer is ours: the CE gradient may overwrite it

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        need_weight: bool,
        need_bias: bool,
        accum_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ) -> None:
        #: logits as ``(V, rows)`` = ``W @ h.T`` (class_dim 0): on CPU this GEMM runs ~15%
        #: faster than ``h @ W.T`` at a few hundred rows (measured at 2048 x 128k)
        self.class_dim = 0 if transposed else 1
        self.weight_dtype = weight.dtype
        self.bias_dtype = bias.dtype if bias is not None else None
        self.w = weight.detach().to(compute_dtype)
        self.b = bias.detach().to(compute_dtype) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.accum_dtype = accum_dtype or compute_dtype
        self.gw = torch.zeros_like(self.w, dtype=self.accum_dtype) if need_weight else None
        self.gb = (
            torch.zeros(self.w.shape[0], dtype=torch.float32, device=self.w.device)
            if need_bias
            else None
        )
        self.buffer: torch.Tensor | None = None

    def logits(self, h: torch.Tensor, track: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hc = h.to(self.compute_dtype)
        rows = hc.shape[0]
        if self.class_dim == 0:
            if self.buffer is None or self.buffer.shape[1] != rows:  # columns must be contiguous
                self.buffer = None
                self.buffer = torch.empty(
                    self.w.shape[0], rows, dtype=self.compute_dtype, device=self.w.device
                )
            out = self.buffer
            if self.b is not None:
                torch.addmm(self.b.unsqueeze(1), self.w, hc.t(), out=out)
            else:
                torch.mm(self.w, hc.t(), out=out)
            return out, hc
        if self.buffer is None or self.buffer.shape[0] < rows:
            self.buffer = torch.empty(
                rows, self.w.shape[0], dtype=self.compute_dtype, device=self.w.device
            )
        out = self.buffer[:rows]
        if self.b is not None:
            torch.addmm(self.b, hc, self.w.t(), out=out)
        else:
            torch.mm(hc, self.w.t(), out=out)
        return out, hc

    def backprop(
        self,
        hc: torch.Tensor,
        grad_logits: torch.Tensor,
        need_hidden: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        # g_vr: the gradient as (V, rows) whatever the layout
        g_vr = grad_logits if self.class_dim == 0 else grad_logits.t()
        if self.gw is not None:
            if self.accum_dtype == self.compute_dtype:
                self.gw.addmm_(g_vr, hc)
            else:
                a = self.accum_dtype
                self.gw.addmm_(g_vr.to(a), hc.to(a))
        if self.gb is not None:
            self.gb.add_(g_vr.sum(1, dtype=torch.float32))
        if not need_hidden:
            return None
        if out is not None:
            return torch.mm(g_vr.t(), self.w, out=out)
        return g_vr.t() @ self.w

    def release(self) -> None:
        self.buffer = None

    def grads(self) -> list[torch.Tensor | None]:
        gw = self.gw.to(self.weight_dtype) if self.gw is not None else None
        gb = self.gb.to(self.bias_dtype) if self.gb is not None else None
        return [gw, gb]


class _ModuleProjection:
    """Any row-wise module; each chunk is differentiated with ``torch.autograd.grad``."""

    owns_logits = False  # the module's output may be saved by its own graph: never overwrite

    def __init__(
        self,
        module: Callable,
        params: Sequence[torch.Tensor],
        need_params: Sequence[bool],
        need_hidden: bool,
    ) -> None:
        self.module = module
        self.need_params = list(need_params)
        self.need_hidden = need_hidden
        self.tracked = [p for p, n in zip(params, need_params, strict=True) if n]
        self.acc: list[torch.Tensor | None] = [None] * len(self.tracked)

    def logits(self, h: torch.Tensor, track: bool) -> tuple[torch.Tensor, object]:
        if not track:
            with torch.no_grad():
                return self.module(h), None
        h_in = h.detach().requires_grad_(self.need_hidden)
        with torch.enable_grad():
            out = self.module(h_in)
        return out.detach(), (h_in, out)

    def backprop(
        self,
        handle: object,
        grad_logits: torch.Tensor,
        need_hidden: bool,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        h_in, logits = handle
        inputs = [h_in, *self.tracked] if self.need_hidden else self.tracked
        grads = list(
            torch.autograd.grad(logits, inputs, grad_outputs=grad_logits, allow_unused=True)
        )
        gh = grads.pop(0) if self.need_hidden else None
        for i, g in enumerate(grads):
            if g is not None:
                self.acc[i] = g if self.acc[i] is None else self.acc[i].add_(g)
        return gh

    def release(self) -> None:
        pass

    def grads(self) -> list[torch.Tensor | None]:
        it = iter(self.acc)
        return [next(it) if n else None for n in self.need_params]


# --------------------------------------------------------------------------------------------
# The chunk loop shared by both variants and both reductions
# --------------------------------------------------------------------------------------------


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[int, torch.Tensor | None]:
    """How many rows have a label, and their indices (None when all of them do)."""
    n = labels.shape[0]
    if torch.compiler.is_compiling():
        # Counting the ignored rows is a host sync, i.e. a graph break: traced code runs them
        # through the kernel, which gives them zero loss and gradient.
        return n, None
    valid = labels != ignore_index
    n_valid = int(valid.sum())  # the one host sync: it lets ignored rows skip every matmul
    return n_valid, None if n_valid == n else valid.nonzero().squeeze(1)


def _row_buffers(hidden: torch.Tensor, ro: RowOptions) -> RowLosses:
    """Per-row loss, z-loss and correctness (zeroed) and predicted tokens (-1), the last three
    when asked for: the values of rows that are skipped (ignored labels)."""
    n = hidden.shape[0]
    device = hidden.device
    loss_rows = torch.zeros(
        n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=device
    )
    z_rows = torch.zeros_like(loss_rows) if ro.lse_square_scale != 0.0 or ro.want_z else None
    correct = torch.zeros(n, dtype=torch.bool, device=device) if ro.want_correct else None
    predicted = None
    if ro.want_predicted:
        predicted = torch.full((n,), -1, dtype=torch.int64, device=device)
    return RowLosses(loss_rows, z_rows, correct, predicted)


def _store_rows(out: RowLosses, idx, part: RowLosses) -> None:
    """Copy one chunk's per-row results into the full-size buffers at ``idx``."""
    out.loss[idx] = part.loss
    for full, chunk in zip(out[1:], part[1:], strict=True):
        if full is not None:
            full[idx] = chunk


def _rows_of(scale: torch.Tensor | None, idx) -> torch.Tensor | None:
    """A per-row scale's entries for ``idx``; a 0-dim (or absent) scale as it is."""
    return scale[idx] if scale is not None and scale.dim() == 1 else scale


def _chunked_pass(
    proj: _LinearProjection | _ModuleProjection,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None,
    opts: _Options,
    *,
    grad_scale: torch.Tensor | None,
    z_grad_scale: torch.Tensor | None = None,
    need_hidden: bool,
) -> tuple[RowLosses, torch.Tensor | None]:
    """Per-row loss terms; with ``grad_scale`` (0-dim or ``(N,)``), also back-propagate
    ``sum_i grad_scale[i] * loss_i + z_grad_scale[i] * z_loss_i`` into ``proj`` and return
    the hidden-state gradient."""
    ro = opts.rows
    need_grad = grad_scale is not None
    n_valid, rows = _valid_rows(labels, ro.ignore_index)
    results = _row_buffers(hidden, ro)
    grad_hidden = None
    if need_grad and need_hidden:
        grad_hidden = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    direct = grad_hidden is not None and rows is None and isinstance(proj, _LinearProjection)
    direct = direct and grad_hidden.dtype == proj.compute_dtype
    for start in range(0, n_valid, opts.chunk_size):
        end = min(start + opts.chunk_size, n_valid)
        idx = slice(start, end) if rows is None else rows[start:end]
        h = hidden[idx]
        lab = labels[idx]
        logits, handle = proj.logits(h, track=need_grad)
        grad_logits = None
        if need_grad:
            grad_logits = logits if proj.owns_logits else torch.empty_like(logits)
        scale, z_scale = _rows_of(grad_scale, idx), _rows_of(z_grad_scale, idx)
        part = cross_entropy_rows(
            logits,
            lab,
            impl=opts.impl,
            ignore_index=ro.ignore_index,
            softcap=ro.softcap,
            grad_scale=scale,
            grad_out=grad_logits,
            weight=weight,
            label_smoothing=ro.label_smoothing,
            lse_square_scale=ro.lse_square_scale,
            z_grad_scale=z_scale,
            want_z=results.z_loss is not None,
            want_correct=ro.want_correct,
            want_predicted=ro.want_predicted,
            token_scaling=ro.token_scaling,
            class_dim=getattr(proj, "class_dim", 1),
        )
        _store_rows(results, idx, part)
        if need_grad:
            out = grad_hidden[start:end] if direct else None
            gh = proj.backprop(handle, grad_logits, need_hidden, out=out)
            if grad_hidden is not None and not direct:
                grad_hidden[idx] = gh.to(grad_hidden.dtype)
        del logits, grad_logits, handle
    proj.release()
    return results, grad_hidden


def _online_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    class_weight: torch.Tensor | None,
    opts: _Options,
    compute_dtype: torch.dtype,
    *,
    grad_scale: torch.Tensor | None,
    z_grad_scale: torch.Tensor | None = None,
) -> tuple[RowLosses, torch.Tensor | None]:
    """:func:`_chunked_pass` for a frozen head: each pass of rows streams the vocabulary once
    (:mod:`.linear_cross_entropy_online`); with ``grad_scale``, returns the hidden gradient."""
    ro = opts.rows
    rows_per_pass, block = opts.online
    n_valid, rows = _valid_rows(labels, ro.ignore_index)
    results = _row_buffers(hidden, ro)
    need_grad = grad_scale is not None
    grad_hidden = None
    if need_grad:
        grad_hidden = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    w, b = weight.detach(), bias.detach() if bias is not None else None
    class_rows = None
    if need_grad and ro.label_smoothing:
        class_rows = weighted_row_sum(w, class_weight, compute_dtype, block)
    workspace = Workspace(
        min(rows_per_pass, n_valid), min(block, w.shape[0]), w.shape[1], compute_dtype, w.device
    )
    for start in range(0, n_valid, rows_per_pass):
        end = min(start + rows_per_pass, n_valid)
        idx = slice(start, end) if rows is None else rows[start:end]
        part, gh = online_rows(
            hidden[idx].detach(),
            labels[idx],
            w,
            b,
            class_weight,
            ro,
            compute_dtype,
            block,
            grad_scale=_rows_of(grad_scale, idx),
            z_grad_scale=_rows_of(z_grad_scale, idx),
            class_weight_rows=class_rows,
            workspace=workspace,
        )
        _store_rows(results, idx, part)
        if gh is not None:
            grad_hidden[idx] = gh.to(grad_hidden.dtype)
    return results, grad_hidden


def _check_first_backward(ctx) -> None:
    # Checked before ctx.saved_tensors, whose version check would give a vaguer error.
    if ctx.consumed:
        raise RuntimeError(
            "fused linear cross-entropy scales its stored gradients in place in backward and "
            "can run backward only once; a second backward with retain_graph=True is not "
            "supported"
        )
    ctx.consumed = True


def _scale(grads: Sequence[torch.Tensor | None], grad_loss: torch.Tensor) -> None:
    for g in grads:
        if g is not None:
            g.mul_(grad_loss)


def _outputs(ctx, rows: RowLosses, labels, scale, z_scale, opts: _Options):
    loss, z, acc = reduce_rows(rows, labels, scale, z_scale, opts.reduction, opts.rows.ignore_index)
    z = z if opts.rows.want_z else None
    extras = [t for t in (z, acc, rows.predicted) if t is not None]
    if extras:
        ctx.mark_non_differentiable(*extras)
    return loss, z, acc, rows.predicted


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


class _LinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, bias, labels, scale, z_scale, class_weight, opts, dtypes
    ):
        compute_dtype, accum_dtype = dtypes
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.opts, ctx.dtypes = opts, dtypes
        ctx.per_row = opts.reduction == "none"
        ctx.consumed = False
        with torch.autocast(hidden.device.type, enabled=False):
            if opts.online is not None:
                g = None if ctx.per_row or not need_h else scale
                rows, gh = _online_pass(
                    hidden,
                    weight,
                    bias,
                    labels,
                    class_weight,
                    opts,
                    compute_dtype,
                    grad_scale=g,
                    z_grad_scale=z_scale,
                )
                if ctx.per_row:
                    ctx.save_for_backward(hidden, weight, bias, labels, class_weight)
                else:
                    ctx.save_for_backward(gh, None, None)
                return _outputs(ctx, rows, labels, scale, z_scale, opts)
            if ctx.per_row:
                proj = _LinearProjection(
                    weight, bias, compute_dtype, False, False, transposed=opts.impl == "torch"
                )
                rows, _ = _chunked_pass(
                    proj, hidden, labels, class_weight, opts, grad_scale=None, need_hidden=False
                )
                ctx.save_for_backward(hidden, weight, bias, labels, class_weight)
                return _outputs(ctx, rows, labels, scale, z_scale, opts)
            proj = _LinearProjection(
                weight, bias, compute_dtype, need_w, need_b, accum_dtype, opts.impl == "torch"
            )
            want = need_h or need_w or need_b
            rows, gh = _chunked_pass(
                proj,
                hidden,
                labels,
                class_weight,
                opts,
                grad_scale=scale if want else None,
                z_grad_scale=z_scale if want else None,
                need_hidden=need_h,
            )
        ctx.save_for_backward(gh, *proj.grads())
        return _outputs(ctx, rows, labels, scale, z_scale, opts)

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_acc, _grad_predicted):  # type: ignore[override]
        nones = (None,) * 6
        if not ctx.per_row:
            _check_first_backward(ctx)
            gh, gw, gb = ctx.saved_tensors
            _scale((gh, gw, gb), grad_loss)
            return gh, gw, gb, *nones
        hidden, weight, bias, labels, class_weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        compute_dtype, accum_dtype = ctx.dtypes
        g = grad_loss.to(torch.float32).contiguous()
        with torch.autocast(hidden.device.type, enabled=False):
            if ctx.opts.online is not None:
                _, gh = _online_pass(
                    hidden,
                    weight,
                    bias,
                    labels,
                    class_weight,
                    ctx.opts,
                    compute_dtype,
                    grad_scale=g if need_h else None,
                    z_grad_scale=g,
                )
                return gh, None, None, *nones
            proj = _LinearProjection(
                weight, bias, compute_dtype, need_w, need_b, accum_dtype, ctx.opts.impl == "torch"
            )
            _, gh = _chunked_pass(
                proj,
                hidden,
                labels,
                class_weight,
                ctx.opts,
                grad_scale=g,
                z_grad_scale=g,
                need_hidden=need_h,
            )
        gw, gb = proj.grads()
        return gh, gw, gb, *nones


class _RngReplay:
    """The CPU (and current CUDA device) generator state, to replay a chunk pass exactly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def fork(self):
        devices = [self.device] if self.cuda is not None else []
        return torch.random.fork_rng(devices=devices)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _ModuleCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, scale, z_scale, class_weight, opts, module, *params):  # type: ignore[override]
        need_h = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[7:]
        ctx.opts, ctx.module = opts, module
        ctx.per_row = opts.reduction == "none"
        ctx.consumed = False
        if ctx.per_row:
            device_type = hidden.device.type
            ctx.rng = _RngReplay(hidden.device)
            ctx.autocast = (
                torch.is_autocast_enabled(device_type),
                torch.get_autocast_dtype(device_type),
            )
            proj = _ModuleProjection(module, params, [False] * len(params), False)
            rows, _ = _chunked_pass(
                proj, hidden, labels, class_weight, opts, grad_scale=None, need_hidden=False
            )
            # Parameters are kept as the very objects the module uses: autograd.grad must
            # find them in the recomputed graph.
            ctx.params = params
            ctx.save_for_backward(hidden, labels, class_weight)
            return _outputs(ctx, rows, labels, scale, z_scale, opts)
        proj = _ModuleProjection(module, params, need_p, need_h)
        want = need_h or any(need_p)
        rows, gh = _chunked_pass(
            proj,
            hidden,
            labels,
            class_weight,
            opts,
            grad_scale=scale if want else None,
            z_grad_scale=z_scale if want else None,
            need_hidden=need_h,
        )
        ctx.save_for_backward(gh, *proj.grads())
        return _outputs(ctx, rows, labels, scale, z_scale, opts)

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_acc, _grad_predicted):  # type: ignore[override]
        nones = (None,) * 6
        if not ctx.per_row:
            _check_first_backward(ctx)
            gh, *gp = ctx.saved_tensors
            _scale((gh, *gp), grad_loss)
            return (gh, *nones, *gp)
        hidden, labels, class_weight = ctx.saved_tensors
        need_h = ctx.needs_input_grad[0]
        proj = _ModuleProjection(ctx.module, ctx.params, ctx.needs_input_grad[7:], need_h)
        enabled, dtype = ctx.autocast
        g = grad_loss.to(torch.float32).contiguous()
        with ctx.rng.fork(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            ctx.rng.restore()
            _, gh = _chunked_pass(
                proj,
                hidden,
                labels,
                class_weight,
                ctx.opts,
                grad_scale=g,
                z_grad_scale=g,
                need_hidden=need_h,
            )
        return (gh, *nones, *proj.grads())


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_hidden(hidden: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(
            "hidden must be a 2-D (N, H) tensor; flatten batch and sequence dims with "
            f"hidden.reshape(-1, H), got {getattr(hidden, 'shape', type(hidden))}"
        )
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")


def _resolve_chunk_size(
    chunk_size: int | None,
    memory_budget: int | None,
    vocab_size: int,
    hidden: torch.Tensor,
    dtype: torch.dtype,
) -> int:
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("give chunk_size or memory_budget, not both")
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1
    ):
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    if chunk_size is None:
        return default_chunk_size(
            vocab_size, hidden.device, dtype, memory_budget, n_rows=max(hidden.shape[0], 1)
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _linear_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the logits are computed in: autocast's when it is on, like ``nn.Linear``."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them or run "
            "under torch.autocast"
        )
    return weight.dtype


def _loss_setup(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    *,
    reduction: str,
    softcap: float | None,
    num_items_in_batch: int | torch.Tensor | None,
    weight: torch.Tensor | None,
    label_smoothing: float,
    lse_square_scale: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Checks, then labels and class weights on the device and the two loss scales."""
    _validate_loss_args(
        labels,
        hidden.shape[0],
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
        n_classes=vocab_size,
        weight=weight,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
    )
    labels = labels.to(hidden.device)
    check_label_range(labels, vocab_size, ignore_index)
    if weight is not None:
        weight = weight.detach().to(hidden.device)
    scale = loss_scale(labels, ignore_index, reduction, num_items_in_batch, weight)
    z_scale = z_loss_scale(labels, ignore_index, reduction, num_items_in_batch)
    return labels, weight, scale, z_scale


def _result(outputs, *wanted: bool):
    """The loss alone, or a :class:`LossOutput` when any of its companions was asked for."""
    return LossOutput(*outputs) if any(wanted) else outputs[0]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    use_token_scaling: bool = False,
    accum_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor | LossOutput:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the ``(N, V)`` logits.

    Equal to ``cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` (the logits in the
    weight's dtype, or autocast's, then the loss in fp32 as transformers does).

    Args:
        hidden: ``(N, H)`` final hidden states (already shifted/flattened for causal LM).
        weight: ``(V, H)`` lm_head weight; frozen, trainable or tied to the embedding.
        labels: ``(N,)`` target ids; ``ignore_index`` rows cost no compute.
        bias: optional ``(V,)`` bias.
        reduction, num_items_in_batch, softcap, ignore_index, label_smoothing,
            lse_square_scale, return_z_loss, return_token_accuracy, return_predicted_tokens:
            as in :func:`accel_fused_ops.kernels.cross_entropy.cross_entropy` (the argmax per
            row is found in the vocabulary pass that computes the loss; no ``(N, V)``
            logits are built for it).
        use_token_scaling: multiply each token's loss (z-loss included) by the model's
            probability of its label, ``softmax(logits)[label]``, held constant: it scales
            the token's gradient but is not differentiated. The normaliser is unchanged
            (``"mean"`` still divides by the number of label tokens). Liger-Kernel's option of
            the same name.
        class_weight: ``(V,)`` class weights (``cross_entropy``'s ``weight``).
        accum_dtype: dtype the weight gradient is summed in over chunks (default: the
            logits' dtype); ``torch.float32`` for a bf16/fp16 head rounds once instead of once
            per chunk, at the cost of an fp32 weight-gradient matmul per chunk.
        chunk_size: rows per chunk; default :func:`default_chunk_size`. For a frozen head
            on the PyTorch path: rows per streaming pass (default 4096).
        memory_budget: bytes one chunk's vocabulary-sized buffers may take, instead of
            ``chunk_size`` (smaller: less memory, slower matmuls). For a frozen head on the
            PyTorch path: bytes of one ``rows x vocabulary block`` block of logits, 4 bytes a
            logit (6 for half precision: the GEMM output and its fp32 copy; default 32 MiB).

    Gradients for ``hidden``, ``weight`` and ``bias`` are computed during forward (skipped
    for those that do not require grad), so backward can run only once per forward. For a
    LoRA-adapted or otherwise wrapped lm_head use :func:`fused_linear_cross_entropy_module`.
    Under ``torch.compile`` ignored rows are not skipped (counting them is a host sync).
    """
    _check_hidden(hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[1]}) to match hidden's last dim, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}"
        )
    if accum_dtype is not None and (
        not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point
    ):
        raise TypeError(f"accum_dtype must be a floating-point torch.dtype, got {accum_dtype!r}")
    vocab = weight.shape[0]
    labels, class_weight, scale, z_scale = _loss_setup(
        hidden,
        labels,
        vocab,
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
        weight=class_weight,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        ignore_index=ignore_index,
    )
    compute_dtype = _linear_compute_dtype(hidden, weight)
    impl = choose_impl(hidden)
    if not torch.is_grad_enabled():
        # needs_input_grad ignores grad mode: detach so no_grad skips the backward projection
        # and the (V, H) weight-gradient buffer.
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    rows = RowOptions(
        int(ignore_index),
        softcap,
        float(label_smoothing),
        float(lse_square_scale),
        want_z=bool(return_z_loss),
        want_correct=bool(return_token_accuracy),
        want_predicted=bool(return_predicted_tokens),
        token_scaling=bool(use_token_scaling),
    )
    size = _resolve_chunk_size(chunk_size, memory_budget, vocab, hidden, compute_dtype)
    online = None
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if impl == "torch" and softcap is None and frozen and not torch.compiler.is_compiling():
        online = online_plan(
            hidden.shape[0], vocab, chunk_size, memory_budget, logit_bytes(compute_dtype)
        )
    opts = _Options(impl, rows, reduction, size, online)
    outputs = _LinearCEFunction.apply(
        hidden,
        weight,
        bias,
        labels,
        scale,
        z_scale,
        class_weight,
        opts,
        (compute_dtype, accum_dtype),
    )
    return _result(outputs, return_z_loss, return_token_accuracy, return_predicted_tokens)


def _vocab_size_of(projection: Callable, hidden: torch.Tensor) -> int:
    for attr in ("out_features", "num_embeddings"):
        value = getattr(projection, attr, None)
        if isinstance(value, int):
            return value
    with torch.no_grad():
        return int(projection(hidden[:1]).shape[-1])


def fused_linear_cross_entropy_module(
    hidden: torch.Tensor,
    projection: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    params: Sequence[torch.Tensor] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    use_token_scaling: bool = False,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor | LossOutput:
    """Cross-entropy of ``projection(hidden)`` computed chunk by chunk, for wrapped lm_heads.

    ``projection`` maps ``(C, H) -> (C, V)`` row by row (each output row depends only on its
    input row), e.g. a PEFT ``lora.Linear`` around the lm_head, or any ``nn.Module`` or
    callable. Each chunk is run under autograd and differentiated at once with
    ``torch.autograd.grad``, so only one chunk's logits and graph are alive at a time.

    Args:
        params: the tensors whose gradients are wanted (they become inputs of the autograd
            graph). Default for an ``nn.Module``: its parameters with ``requires_grad``, e.g.
            only the LoRA A/B matrices; required for a plain callable.
        Others: as in :func:`fused_linear_cross_entropy`.

    Dropout inside the projection draws one mask per chunk; for ``reduction="none"`` the RNG
    state is replayed in backward so the recomputed chunks use the same masks.
    """
    _check_hidden(hidden)
    if not callable(projection):
        raise TypeError(f"projection must be callable (an nn.Module), got {type(projection)}")
    if params is None:
        if not isinstance(projection, nn.Module):
            raise ValueError(
                "params is required when projection is not an nn.Module: pass the tensors "
                "whose gradients you need (or [] if none)"
            )
        params = [p for p in projection.parameters() if p.requires_grad]
    params = list(params)
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError("params must be a sequence of tensors")
    vocab_size = _vocab_size_of(projection, hidden)
    labels, class_weight, scale, z_scale = _loss_setup(
        hidden,
        labels,
        vocab_size,
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
        weight=class_weight,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        ignore_index=ignore_index,
    )
    impl = choose_impl(hidden)
    if not torch.is_grad_enabled():
        # As in fused_linear_cross_entropy: no gradient work under no_grad.
        hidden, params = hidden.detach(), [p.detach() for p in params]
    rows = RowOptions(
        int(ignore_index),
        softcap,
        float(label_smoothing),
        float(lse_square_scale),
        want_z=bool(return_z_loss),
        want_correct=bool(return_token_accuracy),
        want_predicted=bool(return_predicted_tokens),
        token_scaling=bool(use_token_scaling),
    )
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    size = _resolve_chunk_size(chunk_size, memory_budget, vocab_size, hidden, dtype)
    opts = _Options(impl, rows, reduction, size)
    outputs = _ModuleCEFunction.apply(
        hidden, labels, scale, z_scale, class_weight, opts, projection, *params
    )
    return _result(outputs, return_z_loss, return_token_accuracy, return_predicted_tokens)

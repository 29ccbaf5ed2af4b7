"""Fused lm_head + cross-entropy: the loss of ``hidden @ weight.T + bias`` in token chunks.

The full ``(N, V)`` logits (and their fp32 upcast and gradient) never exist: tokens are taken
``chunk_size`` rows at a time; each chunk's logits are computed, turned in place into their
loss gradient by :func:`~accel_fused_ops.kernels.cross_entropy.cross_entropy_rows` (Triton
kernel on CUDA, PyTorch elsewhere), and immediately pushed through the projection's backward
to give the chunk's gradients for ``hidden``, ``weight`` and ``bias``. Backward then only
scales these stored gradients by ``grad_output``. Peak extra memory is one chunk of logits
plus the gradients themselves.

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
import torch.nn.functional as F
from torch import nn

from ..dispatch import choose_impl
from .cross_entropy import check_label_range, cross_entropy_rows, loss_scale
from .cross_entropy import validate_loss_args as _validate_loss_args

__all__ = [
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_module",
]

# Logits elements per chunk. GPUs reach full matmul speed with a few hundred rows against a
# large vocabulary, so 16M elements (32 MiB in bf16) suffices there; CPU GEMMs lose ~40%
# at 128 rows and ~5% at 512 (measured, 2048 x 128k), so CPUs get 64M.
_CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 26}


def default_chunk_size(vocab_size: int, device: torch.device | str = "cuda") -> int:
    """Rows per chunk so that one chunk of logits holds a fixed number of elements.

    The chunk's logits are the only vocabulary-sized buffer alive at a time, so memory no
    longer grows with the number of tokens.
    """
    device_type = torch.device(device).type
    budget = _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS["cuda"])
    return max(1, budget // max(int(vocab_size), 1))


@dataclass(frozen=True)
class _Options:
    impl: str
    ignore_index: int
    softcap: float | None
    reduction: str
    chunk_size: int


# --------------------------------------------------------------------------------------------
# Projections: how one chunk's logits are computed and back-propagated
# --------------------------------------------------------------------------------------------


class _LinearProjection:
    """``h @ weight.T + bias`` in ``compute_dtype``, backward written out as two matmuls.

    Gradients accumulate in ``compute_dtype`` (the weight's dtype unless autocast is on) and
    are cast to the parameters' dtypes at the end; the bias gradient accumulates in fp32.
    """

    owns_logits = True  # the logits buffer is ours: the CE gradient may overwrite it

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        need_weight: bool,
        need_bias: bool,
    ) -> None:
        self.weight_dtype = weight.dtype
        self.bias_dtype = bias.dtype if bias is not None else None
        self.w = weight.detach().to(compute_dtype)
        self.b = bias.detach().to(compute_dtype) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.gw = torch.zeros_like(self.w) if need_weight else None
        self.gb = (
            torch.zeros(self.w.shape[0], dtype=torch.float32, device=self.w.device)
            if need_bias
            else None
        )

    def logits(self, h: torch.Tensor, track: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hc = h.to(self.compute_dtype)
        return F.linear(hc, self.w, self.b), hc

    def backprop(
        self, hc: torch.Tensor, grad_logits: torch.Tensor, need_hidden: bool
    ) -> torch.Tensor | None:
        if self.gw is not None:
            self.gw.addmm_(grad_logits.t(), hc)
        if self.gb is not None:
            self.gb.add_(grad_logits.sum(0, dtype=torch.float32))
        return grad_logits @ self.w if need_hidden else None

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
        self, handle: object, grad_logits: torch.Tensor, need_hidden: bool
    ) -> torch.Tensor | None:
        h_in, out = handle
        inputs = [h_in, *self.tracked] if self.need_hidden else self.tracked
        grads = list(torch.autograd.grad(out, inputs, grad_outputs=grad_logits, allow_unused=True))
        gh = grads.pop(0) if self.need_hidden else None
        for i, g in enumerate(grads):
            if g is not None:
                self.acc[i] = g if self.acc[i] is None else self.acc[i].add_(g)
        return gh

    def grads(self) -> list[torch.Tensor | None]:
        it = iter(self.acc)
        return [next(it) if n else None for n in self.need_params]


# --------------------------------------------------------------------------------------------
# The chunk loop shared by both variants and both reductions
# --------------------------------------------------------------------------------------------


def _chunked_pass(
    proj: _LinearProjection | _ModuleProjection,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    opts: _Options,
    *,
    grad_scale: torch.Tensor | None,
    need_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row losses; with ``grad_scale`` (0-dim or ``(N,)``), also back-propagate
    ``sum_i grad_scale[i] * loss_i`` into ``proj`` and return the hidden-state gradient."""
    n = hidden.shape[0]
    need_grad = grad_scale is not None
    valid = labels != opts.ignore_index
    n_valid = int(valid.sum())  # the one host sync: it lets ignored rows skip every matmul
    rows = None if n_valid == n else valid.nonzero().squeeze(1)
    loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss_rows = torch.zeros(n, dtype=loss_dtype, device=hidden.device)
    grad_hidden = None
    if need_grad and need_hidden:
        grad_hidden = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    for start in range(0, n_valid, opts.chunk_size):
        end = min(start + opts.chunk_size, n_valid)
        idx = slice(start, end) if rows is None else rows[start:end]
        h = hidden[idx]
        lab = labels[idx]
        logits, handle = proj.logits(h, track=need_grad)
        grad_logits = None
        if need_grad:
            grad_logits = logits if proj.owns_logits else torch.empty_like(logits)
        scale = grad_scale
        if grad_scale is not None and grad_scale.dim() == 1:
            scale = grad_scale[idx]
        loss_rows[idx] = cross_entropy_rows(
            logits,
            lab,
            impl=opts.impl,
            ignore_index=opts.ignore_index,
            softcap=opts.softcap,
            grad_scale=scale,
            grad_out=grad_logits,
        )
        if need_grad:
            gh = proj.backprop(handle, grad_logits, need_hidden)
            if grad_hidden is not None:
                grad_hidden[idx] = gh.to(grad_hidden.dtype)
        del logits, grad_logits, handle
    return loss_rows, grad_hidden


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


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


class _LinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, opts, compute_dtype):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.opts, ctx.compute_dtype = opts, compute_dtype
        ctx.per_row = opts.reduction == "none"
        ctx.consumed = False
        with torch.autocast(hidden.device.type, enabled=False):
            if ctx.per_row:
                proj = _LinearProjection(weight, bias, compute_dtype, False, False)
                loss_rows, _ = _chunked_pass(
                    proj, hidden, labels, opts, grad_scale=None, need_hidden=False
                )
                ctx.save_for_backward(hidden, weight, bias, labels)
                return loss_rows
            proj = _LinearProjection(weight, bias, compute_dtype, need_w, need_b)
            want = need_h or need_w or need_b
            loss_rows, gh = _chunked_pass(
                proj, hidden, labels, opts, grad_scale=scale if want else None, need_hidden=need_h
            )
        ctx.save_for_backward(gh, *proj.grads())
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if not ctx.per_row:
            _check_first_backward(ctx)
            gh, gw, gb = ctx.saved_tensors
            _scale((gh, gw, gb), grad_loss)
            return gh, gw, gb, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            proj = _LinearProjection(weight, bias, ctx.compute_dtype, need_w, need_b)
            _, gh = _chunked_pass(
                proj,
                hidden,
                labels,
                ctx.opts,
                grad_scale=grad_loss.to(torch.float32).contiguous(),
                need_hidden=need_h,
            )
        gw, gb = proj.grads()
        return gh, gw, gb, None, None, None, None


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
    def forward(ctx, hidden, labels, scale, opts, module, *params):  # type: ignore[override]
        need_h = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[5:]
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
            loss_rows, _ = _chunked_pass(
                proj, hidden, labels, opts, grad_scale=None, need_hidden=False
            )
            # Parameters are kept as the very objects the module uses: autograd.grad must
            # find them in the recomputed graph.
            ctx.params = params
            ctx.save_for_backward(hidden, labels)
            return loss_rows
        proj = _ModuleProjection(module, params, need_p, need_h)
        want = need_h or any(need_p)
        loss_rows, gh = _chunked_pass(
            proj, hidden, labels, opts, grad_scale=scale if want else None, need_hidden=need_h
        )
        ctx.save_for_backward(gh, *proj.grads())
        return loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if not ctx.per_row:
            _check_first_backward(ctx)
            gh, *gp = ctx.saved_tensors
            _scale((gh, *gp), grad_loss)
            return (gh, None, None, None, None, *gp)
        hidden, labels = ctx.saved_tensors
        need_h = ctx.needs_input_grad[0]
        proj = _ModuleProjection(ctx.module, ctx.params, ctx.needs_input_grad[5:], need_h)
        enabled, dtype = ctx.autocast
        with ctx.rng.fork(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            ctx.rng.restore()
            _, gh = _chunked_pass(
                proj,
                hidden,
                labels,
                ctx.opts,
                grad_scale=grad_loss.to(torch.float32).contiguous(),
                need_hidden=need_h,
            )
        return (gh, None, None, None, None, *proj.grads())


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


def _resolve_chunk_size(chunk_size: int | None, vocab_size: int, device: torch.device) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size, device)
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the ``(N, V)`` logits.

    Equal to ``cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` (the logits in the
    weight's dtype, or autocast's, then the loss in fp32 as transformers does).

    Args:
        hidden: ``(N, H)`` final hidden states (already shifted/flattened for causal LM).
        weight: ``(V, H)`` lm_head weight; frozen, trainable or tied to the embedding.
        labels: ``(N,)`` target ids; ``ignore_index`` rows cost no compute.
        bias: optional ``(V,)`` bias.
        reduction, num_items_in_batch, softcap, ignore_index: as in
            :func:`accel_fused_ops.kernels.cross_entropy.cross_entropy`.
        chunk_size: rows per chunk; default :func:`default_chunk_size` (16M logits on CUDA,
            64M on CPU).

    Gradients for ``hidden``, ``weight`` and ``bias`` are computed during forward (skipped
    for those that do not require grad), so backward can run only once per forward. For a
    LoRA-adapted or otherwise wrapped lm_head use :func:`fused_linear_cross_entropy_module`.
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
    _validate_loss_args(
        labels,
        hidden.shape[0],
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )
    labels = labels.to(hidden.device)
    compute_dtype = _linear_compute_dtype(hidden, weight)
    impl = choose_impl(hidden)
    check_label_range(labels, weight.shape[0], ignore_index)
    if not torch.is_grad_enabled():
        # needs_input_grad ignores grad mode: detach so no_grad skips the backward projection
        # and the (V, H) weight-gradient buffer.
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    opts = _Options(
        impl,
        int(ignore_index),
        softcap,
        reduction,
        _resolve_chunk_size(chunk_size, weight.shape[0], hidden.device),
    )
    scale = loss_scale(labels, ignore_index, reduction, num_items_in_batch)
    return _LinearCEFunction.apply(hidden, weight, bias, labels, scale, opts, compute_dtype)


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
    chunk_size: int | None = None,
) -> torch.Tensor:
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
    _validate_loss_args(
        labels,
        hidden.shape[0],
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )
    labels = labels.to(hidden.device)
    vocab_size = _vocab_size_of(projection, hidden)
    impl = choose_impl(hidden)
    check_label_range(labels, vocab_size, ignore_index)
    if not torch.is_grad_enabled():
        # As in fused_linear_cross_entropy: no gradient work under no_grad.
        hidden, params = hidden.detach(), [p.detach() for p in params]
    opts = _Options(
        impl,
        int(ignore_index),
        softcap,
        reduction,
        _resolve_chunk_size(chunk_size, vocab_size, hidden.device),
    )
    scale = loss_scale(labels, ignore_index, reduction, num_items_in_batch)
    return _ModuleCEFunction.apply(hidden, labels, scale, opts, projection, *params)

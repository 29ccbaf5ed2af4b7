"""Cross-entropy for large vocabularies, without an fp32 copy of the logits.

``transformers`` computes the causal-LM loss as ``F.cross_entropy(logits.float(), ...)``: for
128k+ vocabularies the fp32 upcast, the saved log-softmax and the fp32 gradient are each a full
``(N, V)`` fp32 tensor, which is often the largest allocation of a training step. Here the
loss and the gradient with respect to the logits are computed together in the forward pass,
block by block, in fp32 registers (Triton) or row chunks (PyTorch), and the gradient is
written in the logits' dtype. Backward only scales that stored gradient by ``grad_output``.

Three parts, as every op of this package:

* ``_ce_rows_kernel``: the Triton kernel (one program per row, online logsumexp over
  vocabulary blocks, then a second pass that writes the gradient);
* ``_ce_rows_torch``: the PyTorch reference and CPU path, same contract, chunked over rows;
* ``cross_entropy``: the public function, an autograd Function picking one of the two with
  :func:`accel_fused_ops.dispatch.choose_impl`.

:func:`cross_entropy_rows` is the shared building block, also used by the fused linear
cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..dispatch import choose_impl

__all__ = ["REDUCTIONS", "cross_entropy", "cross_entropy_rows", "validate_loss_args"]

REDUCTIONS = ("mean", "sum", "none")

# Rows per chunk of the PyTorch path are chosen so that one fp32 temporary holds about this
# many elements (32 MiB): memory stays flat whatever N is, and chunks stay large enough for
# vectorised kernels.
_TORCH_CHUNK_ELEMENTS = 1 << 23
# Largest vocabulary block one Triton program holds in registers at a time.
_MAX_BLOCK = 4096


# --------------------------------------------------------------------------------------------
# Triton kernel (GPU path; runs on CPU only under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh accurate to fp32 rounding, portable across backends and the interpreter (which has
    # no libdevice). For |x| < 0.5 the exp form 1 - 2/(e^2x + 1) cancels digits (rel. error
    # 1e-5 at x=1e-3), so an odd Taylor polynomial is used there (truncation < 1e-7 rel.);
    # above, the exp form on |x| loses at most a bit and is exact at +-inf.
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    x2 = x * x
    p = 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = x + x * x2 * p
    return tl.where(a < 0.5, small, tl.where(x < 0, -big, big))


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    labels_ptr,
    loss_ptr,
    scale_ptr,
    scale_stride,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss of one row and, optionally, ``scale * d loss / d logits`` for that row.

    Everything is computed in fp32 whatever the logits' dtype; the gradient is cast on store.
    ``grad_ptr`` may alias ``logits_ptr``: each element is read before it is overwritten.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < n_cols)

    # Pass 1: online logsumexp over vocabulary blocks.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    z_label = tl.load(x_row + label, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    loss = tl.where(ignored, 0.0, tl.where(in_range, lse - z_label, float("nan")))
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # Pass 2: (softmax - onehot) * d softcap * scale, written in the gradient's dtype.
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        g_row = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            # Ignored rows get exact zeros even when scale is inf (mean over zero tokens);
            # rows with an out-of-range label get NaN like their loss.
            g = tl.where(ignored, 0.0, tl.where(in_range, g * scale, float("nan")))
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _ce_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    block_size: int | None = None,
) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    block = block_size or min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    compute_grad = grad_out is not None
    scale = (
        grad_scale.to(device=logits.device, dtype=torch.float32).contiguous()
        if (compute_grad)
        else loss
    )
    _ce_rows_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad_out if compute_grad else logits,
        grad_out.stride(0) if compute_grad else 0,
        labels,
        loss,
        scale,
        1 if scale.dim() == 1 else 0,
        n_cols,
        ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    if compute_grad:
        # The kernel wrote through a raw pointer; tell autograd so misuse of an aliased
        # buffer is reported instead of silently reading gradients as logits.
        torch.autograd.graph.increment_version(grad_out)
    return loss


# --------------------------------------------------------------------------------------------
# PyTorch reference (CPU path and test oracle of the kernel)
# --------------------------------------------------------------------------------------------


def _ce_rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = torch.empty(n_rows, dtype=compute_dtype, device=logits.device)
    step = rows_per_chunk or max(1, _TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        # .to() may return a view of logits (fp32 input), which may also be grad_out: logits
        # are only read until log_softmax has produced its own buffer, written last.
        z = logits[start:end].to(compute_dtype)
        t = None
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = t * softcap
        log_p = torch.log_softmax(z, dim=1)
        del z
        lab = labels[start:end]
        ignored = lab == ignore_index
        safe = torch.where(ignored, torch.zeros_like(lab), lab).unsqueeze(1)
        nll = log_p.gather(1, safe).squeeze(1).neg_()
        loss[start:end] = torch.where(ignored, torch.zeros_like(nll), nll)
        if grad_out is None:
            continue
        g = log_p.exp_()  # softmax, in place
        g.scatter_add_(1, safe, torch.full_like(nll, -1.0).unsqueeze(1))
        if t is not None:
            g.mul_(t.square_().neg_().add_(1.0))  # d softcap(x) / dx = 1 - tanh^2
        scale = grad_scale[start:end] if grad_scale.dim() == 1 else grad_scale
        row_scale = torch.where(ignored, torch.zeros_like(nll), scale.to(compute_dtype))
        g.mul_(row_scale.unsqueeze(1))
        grad_out[start:end].copy_(g)
    return loss


def check_label_range(labels: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise for labels outside ``[0, n_classes)`` that are not ``ignore_index``.

    One reduction and a host sync, on both paths, so a bad label fails the same way
    everywhere (the Triton kernel alone would give NaN losses for such rows).
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels contain {value}, outside the vocabulary [0, {n_classes}) and not equal to "
            f"ignore_index={ignore_index}; mask such positions with ignore_index"
        )


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    impl: str,
    ignore_index: int = -100,
    softcap: float | None = None,
    grad_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row losses, and optionally their gradient, with no autograd involved.

    Returns the ``(N,)`` losses in fp32 (0 for ignored rows). When ``grad_out`` (an ``(N, V)``
    buffer, last dim contiguous, possibly ``logits`` itself) is given, writes
    ``grad_scale[i] * d loss_i / d logits[i]`` into it in its dtype; ``grad_scale`` is a 0-dim
    or ``(N,)`` tensor. ``impl`` is ``"triton"`` or ``"torch"``.
    """
    if grad_out is not None and grad_scale is None:
        raise ValueError("cross_entropy_rows: grad_scale is required when grad_out is given")
    if impl == "triton":
        return _ce_rows_triton(logits, labels, ignore_index, softcap, grad_scale, grad_out)
    if impl == "torch":
        return _ce_rows_torch(logits, labels, ignore_index, softcap, grad_scale, grad_out)
    raise ValueError(f"impl={impl!r} is not valid; expected 'triton' or 'torch'")


# --------------------------------------------------------------------------------------------
# Argument checks shared with the fused linear cross-entropy
# --------------------------------------------------------------------------------------------


def validate_loss_args(
    labels: torch.Tensor,
    n_rows: int,
    *,
    reduction: str,
    softcap: float | None,
    num_items_in_batch: int | torch.Tensor | None,
) -> None:
    """Reject bad loss options with a message naming the argument and the fix."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; expected one of {REDUCTIONS}")
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(
            f"labels must have shape ({n_rows},) to match the rows of the input, got "
            f"{tuple(labels.shape)}; flatten them with labels.reshape(-1)"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if num_items_in_batch is None:
        return
    if reduction == "none":
        raise ValueError(
            "num_items_in_batch normalises a summed loss and cannot be combined with "
            "reduction='none'; use reduction='sum' or 'mean'"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int | float):
        raise TypeError(
            f"num_items_in_batch must be an int, a one-element tensor or None, got "
            f"{type(num_items_in_batch).__name__}"
        )
    elif num_items_in_batch <= 0:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


def loss_scale(
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """The fp32 0-dim factor turning the sum of row losses into the requested loss.

    ``1 / num_items_in_batch`` when given (transformers' gradient-accumulation normalisation),
    else ``1 / (number of non-ignored labels)`` for ``"mean"`` (inf when there are none, so the
    loss is NaN like torch's) and 1 otherwise. Computed on the device: no host sync.
    """
    device = labels.device
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return 1.0 / num_items_in_batch.detach().to(device, torch.float32).reshape(())
        return torch.tensor(1.0 / num_items_in_batch, dtype=torch.float32, device=device)
    if reduction == "mean":
        return 1.0 / (labels != ignore_index).sum().to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Autograd Function and public entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    impl: str
    ignore_index: int
    softcap: float | None
    reduction: str
    inplace_backward: bool


class _CrossEntropyFunction(torch.autograd.Function):
    """Gradient computed in forward, scaled by ``grad_output`` in backward."""

    @staticmethod
    def forward(ctx, logits, labels, scale, opts: _Options):  # type: ignore[override]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if opts.inplace_backward else torch.empty_like(logits)
        per_row = opts.reduction == "none"
        loss_rows = cross_entropy_rows(
            logits,
            labels,
            impl=opts.impl,
            ignore_index=opts.ignore_index,
            softcap=opts.softcap,
            grad_scale=torch.ones_like(scale) if per_row else scale,
            grad_out=grad,
        )
        ctx.per_row = per_row
        ctx.consumed = False
        ctx.save_for_backward(grad)
        return loss_rows if per_row else loss_rows.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "cross_entropy's backward scales its stored gradient in place and can run "
                "only once; backward through it with retain_graph=True a second time is not "
                "supported"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        grad.mul_(grad_loss.unsqueeze(1) if ctx.per_row else grad_loss)
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), labels)`` without the fp32 copies of the logits.

    Args:
        logits: ``(N, V)`` scores, any float dtype; computation is in fp32 (fp64 stays fp64).
        labels: ``(N,)`` class indices; ``ignore_index`` rows add 0 to the loss and get a zero
            gradient.
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (``(N,)``).
        num_items_in_batch: when given, the loss is ``sum / num_items_in_batch`` (how
            transformers' ``ForCausalLMLoss`` normalises over gradient-accumulation steps);
            not allowed with ``reduction="none"``.
        softcap: when given, scores are first mapped to ``softcap * tanh(logits / softcap)``
            (Gemma-2 style final-logit soft-capping), inside the kernel.
        inplace_backward: write the gradient into ``logits``' own storage during forward,
            saving one ``(N, V)`` buffer. Only when nothing reads ``logits`` afterwards: not
            returned to the caller, not saved by another autograd node (the output of a plain
            ``nn.Linear``/matmul is fine). Misuse detected by autograd raises; reading the
            tensor yourself gives gradients, not logits.

    Returns:
        The fp32 loss (0-dim, or ``(N,)`` for ``"none"``), like transformers' upcast loss.

    Backward scales the stored gradient in place, so it can run only once per forward.
    Out-of-range labels raise ``ValueError`` on both paths. Under ``torch.no_grad()`` only the
    loss is computed (no gradient buffer, ``inplace_backward`` leaves ``logits`` untouched).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            "logits must be a 2-D (N, V) tensor; flatten batch and sequence dims with "
            f"logits.reshape(-1, V), got {getattr(logits, 'shape', type(logits))}"
        )
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    validate_loss_args(
        labels,
        logits.shape[0],
        reduction=reduction,
        softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )
    labels = labels.to(logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    impl = choose_impl(logits)
    check_label_range(labels, logits.shape[1], ignore_index)
    if not torch.is_grad_enabled():
        # Inside the autograd Function needs_input_grad ignores grad mode: detach so an eval
        # step under no_grad computes the loss only, not the gradient buffer.
        logits = logits.detach()
    scale = loss_scale(labels, ignore_index, reduction, num_items_in_batch)
    opts = _Options(impl, int(ignore_index), softcap, reduction, bool(inplace_backward))
    return _CrossEntropyFunction.apply(logits, labels, scale, opts)

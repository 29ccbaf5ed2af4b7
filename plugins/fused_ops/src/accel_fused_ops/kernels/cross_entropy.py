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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..dispatch import choose_impl

__all__ = [
    "REDUCTIONS",
    "LossOutput",
    "RowLosses",
    "cross_entropy",
    "cross_entropy_rows",
    "validate_loss_args",
]

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
    z_ptr,
    correct_ptr,
    predicted_ptr,
    weight_ptr,
    scale_ptr,
    scale_stride,
    z_scale_ptr,
    z_scale_stride,
    n_cols,
    ignore_index,
    softcap,
    label_smoothing,
    lse_square_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    RETURN_CORRECT: tl.constexpr,
    RETURN_PREDICTED: tl.constexpr,
    ARGMAX: tl.constexpr,
    TOKEN_SCALING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss terms of one row and, optionally, their scaled gradient for that row.

    Row loss ``(1 - eps) w[y] (lse - z[y]) + eps / V * sum_j w[j] (lse - z[j])`` (``w = 1``
    without class weights) into ``loss_ptr``, ``s * lse^2`` into ``z_ptr`` (z-loss) and
    ``argmax(z) == y`` into ``correct_ptr``. The gradient is ``scale`` times the first plus
    ``z_scale`` times the second. ``argmax(z)`` (first index of the maximum, -1 for an
    ignored row) goes to ``predicted_ptr``; ``ARGMAX`` is set when either of the two needs it.
    With ``TOKEN_SCALING`` both loss terms and their gradient are multiplied by ``p[y] =
    softmax(z)[y]``, held constant (not differentiated). Everything is computed in fp32
    whatever the logits' dtype; the gradient is cast on store. ``grad_ptr`` may alias
    ``logits_ptr``: each element is read before it is overwritten.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < n_cols)
    take = in_range & ~ignored

    # Pass 1: online logsumexp over vocabulary blocks (+ sum_j w_j z_j, sum_j w_j, argmax).
    m = float("-inf")
    s = 0.0
    sum_wz = 0.0
    sum_w = 0.0
    arg = 0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                sum_wz += tl.sum(w * z, axis=0)
                sum_w += tl.sum(w, axis=0)
            else:
                sum_wz += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        block_max = tl.max(z, axis=0)
        if ARGMAX:
            # First index of the maximum, as torch.argmax returns.
            block_arg = tl.min(tl.where(z == block_max, cols, n_cols), axis=0)
            arg = tl.where(block_max > m, block_arg, arg)
        m_new = tl.maximum(m, block_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    if not HAS_WEIGHT:
        sum_w = n_cols * 1.0

    z_label = tl.load(x_row + label, mask=take, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    w_label = 1.0
    if HAS_WEIGHT:
        w_label = tl.load(weight_ptr + label, mask=take, other=0.0).to(tl.float32)
    keep = 1.0 - label_smoothing
    # p[y], the token-scaling factor (finite for every row: z_label is 0 where not taken)
    p_label = tl.exp(z_label - lse) if TOKEN_SCALING else 1.0
    loss = keep * w_label * (lse - z_label)
    if HAS_SMOOTHING:
        loss += label_smoothing / n_cols * (sum_w * lse - sum_wz)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss * p_label, float("nan")))
    tl.store(loss_ptr + row, loss)
    if HAS_Z_LOSS:
        zl = lse_square_scale * lse * lse * p_label
        zl = tl.where(ignored, 0.0, tl.where(in_range, zl, float("nan")))
        tl.store(z_ptr + row, zl)
    if RETURN_CORRECT:
        tl.store(correct_ptr + row, (take & (arg == label)).to(tl.int8))
    if RETURN_PREDICTED:
        tl.store(predicted_ptr + row, tl.where(ignored, -1, arg).to(tl.int64))

    if COMPUTE_GRAD:
        # Pass 2: c * softmax - g (1-eps) w_y onehot - g eps/V w, times d softcap, in the
        # gradient's dtype, with c = g ((1-eps) w_y + eps/V sum_w) + 2 g_z s lse.
        g_ce = tl.load(scale_ptr + row * scale_stride).to(tl.float32) * p_label
        coef = g_ce * (keep * w_label + label_smoothing / n_cols * sum_w)
        if HAS_Z_LOSS:
            g_z = tl.load(z_scale_ptr + row * z_scale_stride).to(tl.float32) * p_label
            coef += 2.0 * lse_square_scale * g_z * lse
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
            g = coef * tl.exp(z - lse) - tl.where(cols == label, g_ce * keep * w_label, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    g -= g_ce * label_smoothing / n_cols * w
                else:
                    g -= g_ce * label_smoothing / n_cols
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            # Ignored rows get exact zeros even when scale is inf (mean over zero tokens);
            # rows with an out-of-range label get NaN like their loss.
            g = tl.where(ignored, 0.0, tl.where(in_range, g, float("nan")))
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


class RowLosses(NamedTuple):
    """Per-row results of :func:`cross_entropy_rows` (fp32, 0 for ignored rows)."""

    #: ``(1 - eps) w[y] (lse - z[y]) + eps / V * sum_j w[j] (lse - z[j])`` per row
    loss: torch.Tensor
    #: ``lse_square_scale * lse^2`` per row, when asked for (``want_z``)
    z_loss: torch.Tensor | None = None
    #: ``argmax(logits) == label`` per row (bool), when asked for (``want_correct``)
    correct: torch.Tensor | None = None
    #: ``argmax(logits)`` per row (int64, -1 for ignored rows), when asked for
    #: (``want_predicted``)
    predicted: torch.Tensor | None = None


@dataclass(frozen=True)
class RowOptions:
    """What the loss of one row is made of; shared by both paths and the linear variant."""

    ignore_index: int = -100
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    want_z: bool = False
    want_correct: bool = False
    want_predicted: bool = False
    #: scale each row's loss terms and gradient by the label's probability (held constant)
    token_scaling: bool = False


def _scale_arg(scale: torch.Tensor | None, device: torch.device, fallback: torch.Tensor):
    if scale is None:
        return fallback, 0
    scale = scale.to(device=device, dtype=torch.float32).contiguous()
    return scale, 1 if scale.dim() == 1 else 0


def _ce_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    block_size: int | None = None,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    z_grad_scale: torch.Tensor | None = None,
    want_z: bool = False,
    want_correct: bool = False,
    want_predicted: bool = False,
    token_scaling: bool = False,
) -> RowLosses:
    n_rows, n_cols = logits.shape
    device = logits.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    has_z = lse_square_scale != 0.0
    z_rows = torch.empty_like(loss) if has_z else None
    correct = torch.empty(n_rows, dtype=torch.int8, device=device) if want_correct else None
    predicted = torch.empty(n_rows, dtype=torch.int64, device=device) if want_predicted else None
    if n_rows == 0:
        return _row_losses(loss, z_rows, correct, want_z, predicted)
    block = block_size or min(triton.next_power_of_2(n_cols), _MAX_BLOCK)
    compute_grad = grad_out is not None
    scale, scale_stride = _scale_arg(grad_scale if compute_grad else None, device, loss)
    z_scale, z_stride = _scale_arg(
        (z_grad_scale if z_grad_scale is not None else grad_scale) if compute_grad else None,
        device,
        loss,
    )
    w = weight.to(device=device, dtype=torch.float32).contiguous() if weight is not None else loss
    _ce_rows_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad_out if compute_grad else logits,
        grad_out.stride(0) if compute_grad else 0,
        labels,
        loss,
        z_rows if has_z else loss,
        correct if want_correct else loss,
        predicted if want_predicted else loss,
        w,
        scale,
        scale_stride,
        z_scale,
        z_stride,
        n_cols,
        ignore_index,
        float(softcap) if softcap is not None else 1.0,
        float(label_smoothing),
        float(lse_square_scale),
        HAS_SOFTCAP=softcap is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_Z_LOSS=has_z,
        RETURN_CORRECT=want_correct,
        RETURN_PREDICTED=want_predicted,
        ARGMAX=want_correct or want_predicted,
        TOKEN_SCALING=token_scaling,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    if compute_grad:
        # The kernel wrote through a raw pointer; tell autograd so misuse of an aliased
        # buffer is reported instead of silently reading gradients as logits.
        torch.autograd.graph.increment_version(grad_out)
    return _row_losses(loss, z_rows, correct, want_z, predicted)


def _row_losses(loss, z_rows, correct, want_z, predicted=None) -> RowLosses:
    if want_z and z_rows is None:
        z_rows = torch.zeros_like(loss)
    return RowLosses(loss, z_rows, correct.bool() if correct is not None else None, predicted)


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
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    z_grad_scale: torch.Tensor | None = None,
    want_z: bool = False,
    want_correct: bool = False,
    want_predicted: bool = False,
    token_scaling: bool = False,
    class_dim: int = 1,
) -> RowLosses:
    """Row chunks, each in as few passes over the ``(rows, V)`` block as the options allow.

    For fp32 logits without soft-cap the gradient is built in ``grad_out`` itself (exp of the
    shifted logits, then one scaling pass); otherwise one fp32 scratch block is reused by
    every chunk, so no vocabulary-sized buffer is allocated per chunk. ``class_dim=0`` takes
    the transposed ``(V, N)`` layout (one token per column, processed in one block), which
    the fused linear cross-entropy produces on CPU because ``W @ h.T`` runs faster there than
    ``h @ W.T``.
    """
    cd = class_dim
    n_cols, n_rows = (logits.shape[1], logits.shape[0]) if cd == 1 else logits.shape
    device = logits.device
    cdt = torch.promote_types(logits.dtype, torch.float32)
    loss = torch.empty(n_rows, dtype=cdt, device=device)
    has_z = lse_square_scale != 0.0
    z_rows = torch.empty_like(loss) if has_z else None
    correct = torch.empty(n_rows, dtype=torch.bool, device=device) if want_correct else None
    predicted = torch.empty(n_rows, dtype=torch.int64, device=device) if want_predicted else None
    eps = float(label_smoothing)
    w = weight.to(device=device, dtype=cdt) if weight is not None else None
    w_sum = w.sum() if w is not None else float(n_cols)
    step = rows_per_chunk or max(1, _TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    step = min(step, max(n_rows, 1)) if cd == 1 else max(n_rows, 1)

    def part(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[a:b] if cd == 1 else t[:, a:b]

    direct = grad_out is not None and grad_out.dtype == cdt
    scratch = None
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        # .to() may return a view of logits (fp32 input), which may also be grad_out: logits
        # are read by every reduction below before the exp pass overwrites them.
        z = part(logits, start, end).to(cdt)
        t = None
        if softcap is not None:
            t = torch.tanh(z / softcap)
            z = t * softcap
        lab = labels[start:end]
        ignored = lab == ignore_index
        in_range = (lab >= 0) & (lab < n_cols)
        take = in_range & ~ignored
        safe = torch.where(take, lab, torch.zeros_like(lab)).unsqueeze(cd)
        z_label = z.gather(cd, safe).squeeze(cd)
        m = z.amax(cd, keepdim=True)
        sum_wz = None
        if eps:
            if w is None:
                sum_wz = z.sum(cd)
            else:
                sum_wz = z @ w if cd == 1 else w @ z
        if correct is not None or predicted is not None:
            arg = z.argmax(cd)  # first index of the maximum
            if correct is not None:
                correct[start:end] = take & (arg == lab)
            if predicted is not None:
                predicted[start:end] = torch.where(ignored, -1, arg)
        if direct:
            buf = part(grad_out, start, end)
        else:
            if scratch is None:
                shape = (step, n_cols) if cd == 1 else (n_cols, step)
                scratch = torch.empty(shape, dtype=cdt, device=device)
            buf = part(scratch, 0, end - start)
        torch.sub(z, m, out=buf)
        buf.exp_()
        s = buf.sum(cd)
        lse = m.squeeze(cd) + s.log()
        w_label = w[safe.squeeze(cd)] if w is not None else 1.0
        row = (1.0 - eps) * w_label * (lse - z_label)
        if eps:
            row = row + eps / n_cols * (w_sum * lse - sum_wz)
        # p[y], the token-scaling factor (finite on every row: the gather used a safe index)
        p_label = torch.exp(z_label - lse) if token_scaling else None
        if p_label is not None:
            row = row * p_label
        nan = torch.full_like(row, float("nan"))
        zero = torch.zeros_like(row)
        loss[start:end] = torch.where(ignored, zero, torch.where(in_range, row, nan))
        if has_z:
            zl = lse_square_scale * lse * lse
            if p_label is not None:
                zl = zl * p_label
            z_rows[start:end] = torch.where(ignored, zero, torch.where(in_range, zl, nan))
        if grad_out is None:
            continue
        g_ce = grad_scale[start:end] if grad_scale.dim() == 1 else grad_scale.expand(end - start)
        # Ignored rows: exact zeros even for an inf scale; out-of-range labels: NaN rows.
        g_ce = torch.where(ignored, zero, torch.where(in_range, g_ce.to(cdt), nan))
        if p_label is not None:
            g_ce = g_ce * p_label
        coef = g_ce * ((1.0 - eps) * w_label + eps / n_cols * w_sum)
        if has_z:
            zs = z_grad_scale if z_grad_scale is not None else grad_scale
            g_z = zs[start:end] if zs.dim() == 1 else zs.expand(end - start)
            g_z = torch.where(ignored, zero, g_z.to(cdt))
            if p_label is not None:
                g_z = g_z * p_label
            coef = coef + 2.0 * lse_square_scale * g_z * lse
        buf.mul_((coef / s).unsqueeze(cd))  # coef * softmax
        if eps:
            if w is None:
                buf.sub_((g_ce * (eps / n_cols)).unsqueeze(cd))
            else:
                buf.addcmul_(g_ce.unsqueeze(cd), w.unsqueeze(1 - cd), value=-eps / n_cols)
        buf.scatter_add_(cd, safe, (-(1.0 - eps) * g_ce * w_label).unsqueeze(cd))
        if t is not None:
            buf.mul_(t.square_().neg_().add_(1.0))  # d softcap(x) / dx = 1 - tanh^2
        if not direct:
            part(grad_out, start, end).copy_(buf)
    return _row_losses(loss, z_rows, correct, want_z, predicted)


def check_label_range(labels: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise for labels outside ``[0, n_classes)`` that are not ``ignore_index``.

    One reduction and a host sync, on both paths, so a bad label fails the same way
    everywhere. Skipped while ``torch.compile`` traces (a host sync is a graph break): the
    rows of such labels then get a NaN loss and NaN gradients, on both paths.
    """
    if torch.compiler.is_compiling():
        return
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
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    z_grad_scale: torch.Tensor | None = None,
    want_z: bool = False,
    want_correct: bool = False,
    want_predicted: bool = False,
    token_scaling: bool = False,
    class_dim: int = 1,
) -> RowLosses:
    """Per-row loss terms, and optionally their gradient, with no autograd involved.

    Returns :class:`RowLosses` in fp32 (0 for ignored rows). When ``grad_out`` (an ``(N, V)``
    buffer, last dim contiguous, possibly ``logits`` itself) is given, writes
    ``grad_scale[i] * d loss_i / d logits[i] + z_grad_scale[i] * d z_loss_i / d logits[i]``
    into it in its dtype; the scales are 0-dim or ``(N,)`` tensors (``z_grad_scale`` defaults
    to ``grad_scale``). ``token_scaling`` multiplies row ``i``'s loss terms and gradient by
    ``softmax(logits[i])[label_i]``, held constant. ``impl`` is ``"triton"`` or ``"torch"``; ``class_dim=0`` (torch only)
    takes ``(V, N)`` logits and gradient instead.
    """
    if grad_out is not None and grad_scale is None:
        raise ValueError("cross_entropy_rows: grad_scale is required when grad_out is given")
    extra = {
        "weight": weight,
        "label_smoothing": label_smoothing,
        "lse_square_scale": lse_square_scale,
        "z_grad_scale": z_grad_scale,
        "want_z": want_z,
        "want_correct": want_correct,
        "want_predicted": want_predicted,
        "token_scaling": token_scaling,
    }
    if class_dim != 1:
        if impl != "torch" or class_dim != 0:
            raise ValueError("class_dim=0 (the (V, N) layout) is only on the torch path")
        extra["class_dim"] = 0
    if impl == "triton":
        return _ce_rows_triton(logits, labels, ignore_index, softcap, grad_scale, grad_out, **extra)
    if impl == "torch":
        return _ce_rows_torch(logits, labels, ignore_index, softcap, grad_scale, grad_out, **extra)
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
    n_classes: int | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
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
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, int | float):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if isinstance(lse_square_scale, bool) or not isinstance(lse_square_scale, int | float):
        raise TypeError(f"lse_square_scale must be a float, got {type(lse_square_scale).__name__}")
    if not lse_square_scale >= 0.0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise TypeError("weight must be a floating-point tensor of one weight per class")
        if weight.dim() != 1 or (n_classes is not None and weight.shape[0] != n_classes):
            raise ValueError(
                f"weight must have shape ({n_classes},), one weight per class, got "
                f"{tuple(weight.shape)}"
            )
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
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 0-dim factor turning the sum of row losses into the requested loss.

    ``1 / num_items_in_batch`` when given (transformers' gradient-accumulation normalisation),
    else for ``"mean"`` ``1 / (number of non-ignored labels)``, or ``1 / sum of their class
    weights`` with ``weight`` (as torch's ``cross_entropy``; inf when there are none, so the
    loss is NaN like torch's), and 1 otherwise. Computed on the device: no host sync.
    """
    device = labels.device
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return 1.0 / num_items_in_batch.detach().to(device, torch.float32).reshape(())
        return torch.tensor(1.0 / num_items_in_batch, dtype=torch.float32, device=device)
    if reduction == "mean":
        valid = labels != ignore_index
        if weight is None:
            return 1.0 / valid.sum().to(torch.float32)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        w = weight.detach().to(device, torch.float32)[safe]
        return 1.0 / torch.where(valid, w, torch.zeros_like(w)).sum()
    return torch.ones((), dtype=torch.float32, device=device)


def token_accuracy(correct: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Fraction of non-ignored rows whose top-scoring class is the label (NaN if none)."""
    valid = (labels != ignore_index).sum().to(torch.float32)
    return correct.sum().to(torch.float32) / valid


class LossOutput(NamedTuple):
    """The loss with its logging companions, returned when one of them is asked for."""

    #: the differentiable loss, z-loss term included
    loss: torch.Tensor
    #: the z-loss term (``lse_square_scale * lse^2``, reduced like the loss), detached
    z_loss: torch.Tensor | None
    #: fraction of non-ignored tokens whose argmax is the label, detached
    token_accuracy: torch.Tensor | None
    #: ``(N,)`` int64 argmax of each row's logits, -1 for ignored rows
    predicted_tokens: torch.Tensor | None = None


def reduce_rows(
    rows: RowLosses,
    labels: torch.Tensor,
    scale: torch.Tensor,
    z_scale: torch.Tensor,
    reduction: str,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss (z-loss included), z-loss and token accuracy from the per-row terms."""
    z = rows.z_loss
    if reduction == "none":
        loss = rows.loss if z is None else rows.loss + z
        acc = rows.correct.to(torch.float32) if rows.correct is not None else None
        return loss, z, acc
    loss = rows.loss.sum() * scale
    if z is not None:
        z = z.sum() * z_scale
        loss = loss + z
    acc = token_accuracy(rows.correct, labels, ignore_index) if rows.correct is not None else None
    return loss, z, acc


# --------------------------------------------------------------------------------------------
# Autograd Function and public entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    impl: str
    rows: RowOptions
    reduction: str
    inplace_backward: bool


class _CrossEntropyFunction(torch.autograd.Function):
    """Gradient computed in forward, scaled by ``grad_output`` in backward."""

    @staticmethod
    def forward(ctx, logits, labels, scale, z_scale, weight, opts: _Options):  # type: ignore[override]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if opts.inplace_backward else torch.empty_like(logits)
        per_row = opts.reduction == "none"
        ro = opts.rows
        rows = cross_entropy_rows(
            logits,
            labels,
            impl=opts.impl,
            ignore_index=ro.ignore_index,
            softcap=ro.softcap,
            grad_scale=torch.ones_like(scale) if per_row else scale,
            z_grad_scale=torch.ones_like(z_scale) if per_row else z_scale,
            grad_out=grad,
            weight=weight,
            label_smoothing=ro.label_smoothing,
            lse_square_scale=ro.lse_square_scale,
            want_z=ro.want_z,
            want_correct=ro.want_correct,
            want_predicted=ro.want_predicted,
        )
        loss, z, acc = reduce_rows(rows, labels, scale, z_scale, opts.reduction, ro.ignore_index)
        ctx.per_row = per_row
        ctx.consumed = False
        ctx.save_for_backward(grad)
        extras = [t for t in (z, acc, rows.predicted) if t is not None]
        if extras:
            ctx.mark_non_differentiable(*extras)
        return loss, z, acc, rows.predicted

    @staticmethod
    def backward(ctx, grad_loss, _grad_z, _grad_acc, _grad_predicted):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "cross_entropy's backward scales its stored gradient in place and can run "
                "only once; backward through it with retain_graph=True a second time is not "
                "supported"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None
        grad.mul_(grad_loss.unsqueeze(1) if ctx.per_row else grad_loss)
        return grad, None, None, None, None, None


def z_loss_scale(
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
) -> torch.Tensor:
    """The z-loss's normaliser: per token, never per class weight (as Liger's)."""
    return loss_scale(labels, ignore_index, reduction, num_items_in_batch)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_predicted_tokens: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | LossOutput:
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
        label_smoothing, weight: as ``torch.nn.functional.cross_entropy``'s (the mean divides
            by the sum of the labels' class weights).
        lse_square_scale: z-loss ``lse_square_scale * logsumexp(logits)^2`` added per
            non-ignored row (PaLM), normalised per token (mean, sum or ``num_items_in_batch``).
        return_z_loss, return_token_accuracy: return a :class:`LossOutput` with the z-loss
            term and/or the fraction of non-ignored rows whose argmax is the label, both
            computed in the same pass and detached, for logging.
        return_predicted_tokens: return a :class:`LossOutput` whose ``predicted_tokens`` is
            the ``(N,)`` int64 argmax of each row (of the soft-capped scores with
            ``softcap``; ties to the first index, as ``torch.argmax``), -1 for
            ``ignore_index`` rows, found in the loss's own pass over the vocabulary.
        inplace_backward: write the gradient into ``logits``' own storage during forward,
            saving one ``(N, V)`` buffer. Only when nothing reads ``logits`` afterwards: not
            returned to the caller, not saved by another autograd node (the output of a plain
            ``nn.Linear``/matmul is fine). Misuse detected by autograd raises; reading the
            tensor yourself gives gradients, not logits.

    Returns:
        The fp32 loss (0-dim, or ``(N,)`` for ``"none"``), like transformers' upcast loss, or
        a :class:`LossOutput` when ``return_z_loss``, ``return_token_accuracy`` or
        ``return_predicted_tokens`` is set.

    Backward scales the stored gradient in place, so it can run only once per forward.
    Out-of-range labels raise ``ValueError`` on both paths (NaN rows under
    ``torch.compile``, which cannot host-sync). Under ``torch.no_grad()`` only the loss is
    computed (no gradient buffer, ``inplace_backward`` leaves ``logits`` untouched).
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
        n_classes=logits.shape[1],
        weight=weight,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
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
    if weight is not None:
        weight = weight.detach().to(logits.device)
    scale = loss_scale(labels, ignore_index, reduction, num_items_in_batch, weight)
    z_scale = z_loss_scale(labels, ignore_index, reduction, num_items_in_batch)
    rows = RowOptions(
        int(ignore_index),
        softcap,
        float(label_smoothing),
        float(lse_square_scale),
        want_z=bool(return_z_loss),
        want_correct=bool(return_token_accuracy),
        want_predicted=bool(return_predicted_tokens),
    )
    opts = _Options(impl, rows, reduction, bool(inplace_backward))
    loss, z, acc, predicted = _CrossEntropyFunction.apply(
        logits, labels, scale, z_scale, weight, opts
    )
    if return_z_loss or return_token_accuracy or return_predicted_tokens:
        return LossOutput(loss, z, acc, predicted)
    return loss

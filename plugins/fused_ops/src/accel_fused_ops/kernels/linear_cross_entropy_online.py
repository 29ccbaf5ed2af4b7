"""Fused linear cross-entropy for a frozen lm_head: one streaming pass over the vocabulary.

When neither the weight nor the bias needs a gradient (LoRA, QLoRA, a frozen head), the
hidden-state gradient of row ``i`` needs the softmax only through weighted sums of weight rows:

    dL/dh = g * (A * sum_j p_j W_j - B * W_y - eps / V * sum_j c_j W_j)
            + g_z * 2 * s_z * lse * sum_j p_j W_j

with ``c`` the class weights (ones by default), ``A = (1 - eps) c_y + eps * sum(c) / V``,
``B = (1 - eps) c_y`` (``eps`` label smoothing, ``s_z`` the z-loss scale, ``g`` / ``g_z`` the
upstream scales of the loss and z-loss terms). ``sum_j p_j W_j`` is computed as flash
attention computes its output: vocabulary blocks are streamed once, each block's logits are
exponentiated against a reference row maximum, and the accumulator is rescaled when a block's
maximum exceeds it by more than ``RESCALE_MARGIN``. Rows are taken thousands at a time (the
block, not the rows, bounds the memory), so the two GEMMs per block run at full speed with a
few MiB of logits alive, and the head is read once per pass instead of twice per chunk as in
the chunked path.

The PyTorch path of :mod:`.linear_cross_entropy` uses this for frozen heads without a logit
soft-cap (the soft-cap's derivative differs per logit and breaks the factorisation).
"""

from __future__ import annotations

import torch

from .cross_entropy import RowLosses, RowOptions

__all__ = [
    "Workspace",
    "logit_bytes",
    "online_plan",
    "online_rows",
    "weighted_row_sum",
    "work_dtype",
]

#: Rows per pass by default: enough for CPU GEMMs to reach their peak against a 2048-wide head.
ONLINE_ROWS = 4096
#: Default size of one block's logits buffers (rows x vocabulary block), in bytes.
ONLINE_BLOCK_BYTES = 32 << 20
#: Narrowest vocabulary block worth a GEMM; a budget below rows x this many logits takes rows.
MIN_VOCAB_BLOCK = 256
#: How far a block's maximum may exceed a row's reference maximum before the row is rescaled:
#: exponentials stay below e**4, and after the first blocks the maximum rarely grows that much,
#: so the (rows, H) accumulator is almost never rescaled.
RESCALE_MARGIN = 4.0


def logit_bytes(compute_dtype: torch.dtype) -> int:
    """Bytes a block needs per logit: the GEMM output, plus its fp32 copy for half precision."""
    work = work_dtype(compute_dtype)
    return work.itemsize + (compute_dtype.itemsize if work != compute_dtype else 0)


def online_plan(
    n_rows: int,
    vocab_size: int,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    bytes_per_logit: int = 4,
) -> tuple[int, int]:
    """``(rows per pass, vocabulary block)`` for a block of logits within the budget.

    ``memory_budget`` (default 32 MiB) bounds one ``rows x block`` block of logits at
    ``bytes_per_logit`` (:func:`logit_bytes`); ``chunk_size`` fixes the rows and leaves the
    block to the budget. Otherwise rows are ``min(n_rows, 4096)``, fewer when the budget would
    leave a block under 256 columns.
    """
    budget = ONLINE_BLOCK_BYTES if memory_budget is None else memory_budget
    vocab = max(int(vocab_size), 1)
    rows = chunk_size if chunk_size is not None else min(max(n_rows, 1), ONLINE_ROWS)
    floor = min(MIN_VOCAB_BLOCK, vocab)
    if chunk_size is None and budget // (rows * bytes_per_logit) < floor:
        rows = max(1, budget // (floor * bytes_per_logit))
    block = max(1, min(vocab, budget // (rows * bytes_per_logit)))
    return int(rows), int(block)


def work_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision logits (exponentials, sums and the accumulator), else the
    compute dtype itself."""
    return torch.float32 if compute_dtype.itemsize < 4 else compute_dtype


class Workspace:
    """Buffers one pass reuses for every block: the GEMM's logits (compute dtype), their
    work-dtype copy (the same memory when the dtypes agree) and, for half precision, the
    second GEMM's ``(rows, H)`` product before it is added to the fp32 accumulator."""

    def __init__(
        self, rows: int, block: int, hidden_size: int, compute_dtype: torch.dtype, device
    ) -> None:
        work = work_dtype(compute_dtype)
        self.logits = torch.empty(rows * block, dtype=compute_dtype, device=device)
        self.work = self.logits
        self.product = None
        if work != compute_dtype:
            self.work = torch.empty(rows * block, dtype=work, device=device)
            self.product = torch.empty(rows * hidden_size, dtype=compute_dtype, device=device)


def weighted_row_sum(
    weight: torch.Tensor,
    class_weight: torch.Tensor | None,
    compute_dtype: torch.dtype,
    block: int,
) -> torch.Tensor:
    """``sum_j c_j W_j`` in the work dtype, block by block (no full-size upcast of the head)."""
    work = work_dtype(compute_dtype)
    total = torch.zeros(weight.shape[1], dtype=work, device=weight.device)
    for v0 in range(0, weight.shape[0], block):
        wb = weight[v0 : v0 + block].to(compute_dtype).to(work)
        if class_weight is None:
            total.add_(wb.sum(0))
        else:
            total.addmv_(wb.t(), class_weight[v0 : v0 + block].to(work))
    return total


def online_rows(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    opts: RowOptions,
    compute_dtype: torch.dtype,
    block: int,
    *,
    grad_scale: torch.Tensor | None = None,
    z_grad_scale: torch.Tensor | None = None,
    class_weight_rows: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> tuple[RowLosses, torch.Tensor | None]:
    """Loss terms of ``hidden @ weight.T + bias`` for rows whose labels are all valid, and,
    with ``grad_scale``, the hidden-state gradient of ``sum_i grad_scale[i] * loss_i +
    z_grad_scale[i] * z_loss_i`` (fp32 for half-precision inputs, else their dtype).

    Both GEMMs run in ``compute_dtype`` (the logits are those of an unfused lm_head; the
    probabilities enter the second GEMM rounded to it, as the logits gradient does in an
    unfused backward); maxima, sums and the accumulator are fp32 or wider.
    ``class_weight_rows`` is ``sum_j c_j W_j`` (:func:`weighted_row_sum`), needed with label
    smoothing; ``workspace`` holds at least ``rows x block`` logits, reused across calls.
    The argmax of a row (``opts.want_correct`` / ``want_predicted``) is the running maximum of
    the blocks with its index, ties to the first; ``opts.token_scaling`` multiplies the row's
    loss terms and gradient coefficients by ``exp(z[y] - lse)``, known once the pass is over.
    """
    work = work_dtype(compute_dtype)
    rows, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    width0 = min(block, vocab)
    if workspace is None or workspace.logits.numel() < rows * width0:
        workspace = Workspace(rows, width0, hidden.shape[1], compute_dtype, dev)
    h = hidden.to(compute_dtype)
    eps, s_z = opts.label_smoothing, opts.lse_square_scale
    need_grad = grad_scale is not None
    has_z = s_z != 0.0 or opts.want_z
    stat = torch.promote_types(work, torch.float32)  # reference max, sum and the loss terms
    m = torch.full((rows,), float("-inf"), dtype=stat, device=dev)
    total = torch.zeros(rows, dtype=stat, device=dev)
    z_label = torch.zeros(rows, dtype=stat, device=dev)
    acc = torch.zeros(rows, h.shape[1], dtype=work, device=dev) if need_grad else None
    product = None
    if acc is not None and workspace.product is not None:
        product = workspace.product[: acc.numel()].view_as(acc)
    wz = torch.zeros(rows, dtype=work, device=dev) if eps else None  # sum_j c_j z_j
    want_arg = opts.want_correct or opts.want_predicted
    best = torch.full_like(m, float("-inf")) if want_arg else None
    best_at = torch.zeros(rows, dtype=torch.long, device=dev) if want_arg else None
    for v0 in range(0, vocab, block):
        wb = weight[v0 : v0 + block].to(compute_dtype)
        width = wb.shape[0]
        s = workspace.logits[: rows * width].view(rows, width)
        if bias is not None:
            torch.addmm(bias[v0 : v0 + width].to(compute_dtype), h, wb.t(), out=s)
        else:
            torch.mm(h, wb.t(), out=s)
        local = labels - v0
        here = (local >= 0) & (local < width)
        picked = s.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
        z_label = torch.where(here, picked.to(stat), z_label)
        if best is not None:
            top, top_at = s.max(1)
            top = top.to(stat)
            better = top > best  # strict: ties keep the earlier block, i.e. the first index
            best = torch.where(better, top, best)
            best_at = torch.where(better, top_at + v0, best_at)
        else:
            top = s.amax(1).to(stat)
        p = s
        if workspace.work is not workspace.logits:
            p = workspace.work[: rows * width].view(rows, width)
            p.copy_(s)
        if wz is not None:
            wz.add_(
                p.sum(1) if class_weight is None else p @ class_weight[v0 : v0 + width].to(work)
            )
        grow = top > m + RESCALE_MARGIN
        if bool(grow.any()):  # rare after the first block; rows that did not grow keep alpha 1
            m_new = torch.where(grow, top, m)
            alpha = torch.exp(m - m_new)
            total.mul_(alpha)
            if acc is not None:
                acc.mul_(alpha.unsqueeze(1).to(work))
            m = m_new
        p.sub_(m.unsqueeze(1).to(work)).exp_()
        total.add_(p.sum(1, dtype=stat))
        if acc is not None:
            if product is None:
                acc.addmm_(p, wb)
            else:
                s.copy_(p)  # probabilities in the GEMM dtype
                torch.mm(s, wb, out=product)
                acc.add_(product)
    lse = m + torch.log(total)
    c_y = class_weight[labels].to(stat) if class_weight is not None else torch.ones_like(lse)
    loss = (1.0 - eps) * c_y * (lse - z_label)
    if eps:
        c_sum = float(vocab) if class_weight is None else class_weight.to(stat).sum()
        loss = loss + eps / vocab * (c_sum * lse - wz.to(stat))
    z_loss = s_z * lse * lse if has_z else None
    p_label = torch.exp(z_label - lse) if opts.token_scaling else None  # held constant
    if p_label is not None:
        loss = loss * p_label
        z_loss = z_loss * p_label if z_loss is not None else None
    correct = best_at == labels if opts.want_correct else None
    predicted = None
    if opts.want_predicted:
        predicted = torch.where(labels == opts.ignore_index, -1, best_at)
    result = RowLosses(loss, z_loss, correct, predicted)
    if not need_grad:
        return result, None
    g = grad_scale.to(dev, stat)
    g_z = z_grad_scale.to(dev, stat) if s_z != 0.0 else None
    if p_label is not None:
        g = g * p_label
        g_z = g_z * p_label if g_z is not None else None
    coef = (1.0 - eps) * c_y
    if eps:
        coef = coef + eps * c_sum / vocab
    coef = g * coef
    if g_z is not None:
        coef = coef + g_z * (2.0 * s_z) * lse
    grad = acc.mul_((coef / total).unsqueeze(1).to(work))
    # In place, so the gradient needs no (rows, H) temporaries beyond the label rows.
    label_rows = weight[labels].to(compute_dtype).to(work)
    grad.addcmul_(label_rows, (g * (1.0 - eps) * c_y).unsqueeze(1).to(work), value=-1.0)
    if eps:
        grad.addr_((g * (eps / vocab)).to(work).expand(rows), class_weight_rows, alpha=-1.0)
    return result, grad

"""Per-example loss from the training forward's own logits (no second forward).

Labels are shifted as transformers' causal-LM loss shifts them: the logit at position ``t``
predicts the label at ``t + 1``; ``-100`` labels take no loss. A padded batch has one
example per row. A padding-free batch is one packed row whose examples start at
``cu_seq_lens`` (the first label of every example is -100, so no prediction crosses two
examples); the loss of each packed segment is that example's loss. The entropy rewards
use the same pass: the Shannon entropy of the predicted distribution at each labelled
position.

Cost: with the model's default loss (transformers' ``ForCausalLMLoss``),
:func:`causal_lm_loss_and_sums` computes the loss and the per-example sums in one pass, so
train_loss costs a few reductions and the entropy rewards one more elementwise pass over the
log-probabilities the loss computes anyway. With another loss function, one more pass over
the logits without autograd, the fp32 upcast ``CHUNK`` positions at a time.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
#: positions whose logits are upcast at once (bounds the extra memory: CHUNK x vocab fp32)
CHUNK = 1024


@torch.no_grad()
def per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, tokens)`` per example: summed token cross-entropy and label count."""
    sums, tokens = per_example_sums(logits, labels, cu_seq_lens)
    return sums[0], tokens


@torch.no_grad()
def per_example_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cu_seq_lens: torch.Tensor | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, tokens)``: ``sums[0]`` is each example's summed token cross-entropy; with
    ``entropy``, ``sums[1]`` and ``sums[2]`` sum the Shannon entropy of the predicted
    distribution and its square over the same positions (those with a label)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    rows, length = labels.shape
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])  # a view of the forward's logits
    flat_target = target.reshape(-1).to(logits.device)
    n = flat_target.numel()
    per_token = torch.zeros(3 if entropy else 1, n, dtype=torch.float32, device=logits.device)
    for start in range(0, n, CHUNK):  # fp32 copies of CHUNK rows at most
        end = start + CHUNK
        chunk, tgt = flat[start:end].float(), flat_target[start:end]
        if not entropy:  # the fused kernel is the cheapest way to the loss alone
            per_token[0, start:end] = torch.nn.functional.cross_entropy(
                chunk, tgt, ignore_index=IGNORE_INDEX, reduction="none"
            )
            continue
        logp = torch.log_softmax(chunk, dim=-1)
        per_token[0, start:end] = -logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
        h = -(logp.exp() * logp).sum(dim=-1)
        per_token[1, start:end] = h
        per_token[2, start:end] = h * h
    return _per_example(per_token, flat_target, rows, length, cu_seq_lens)


def _per_example(
    per_token: torch.Tensor,
    flat_target: torch.Tensor,
    rows: int,
    length: int,
    cu_seq_lens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum ``per_token`` (C, rows * length) over the labelled positions of each example."""
    device = per_token.device
    valid = (flat_target != IGNORE_INDEX).float()
    per_token = per_token * valid
    if cu_seq_lens is None:
        example = torch.arange(rows, device=device).repeat_interleave(length)
        count = rows
    else:
        if rows != 1:
            raise ValueError(f"a packed batch has one row, got {rows}")
        bounds = cu_seq_lens.to(device).long()
        # the prediction at t is of token t + 1: it belongs to the example holding t + 1
        where = torch.arange(1, length + 1, device=device).clamp(max=length - 1)
        example = torch.searchsorted(bounds[1:], where, right=True)
        count = bounds.numel() - 1
    sums = torch.zeros(per_token.shape[0], count, device=device)
    sums.index_add_(1, example, per_token)
    tokens = torch.zeros(count, device=device).index_add_(0, example, valid)
    return sums, tokens


def causal_lm_loss_and_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' causal-LM loss (``ForCausalLMLoss``: shifted labels, -100 ignored, the
    sum over ``num_items_in_batch`` when given, else the mean) and, from the same token
    losses (and, with ``entropy``, the same log-probabilities), ``(sums, tokens)`` per
    example as :func:`per_example_sums` returns them: one pass for both."""
    rows, length = labels.shape
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat_target = target.reshape(-1).to(logits.device)
    flat = logits.float().reshape(-1, logits.shape[-1])
    stats = None
    if entropy:
        logp = torch.log_softmax(flat, dim=-1)
        picked = -logp.gather(1, flat_target.clamp(min=0)[:, None])[:, 0]
        token = picked * (flat_target != IGNORE_INDEX)  # what cross_entropy gives, ignored = 0
        with torch.no_grad():
            h = -(logp.exp() * logp).sum(dim=-1)
            stats = torch.stack([h, h * h])
    else:
        token = torch.nn.functional.cross_entropy(
            flat, flat_target, ignore_index=IGNORE_INDEX, reduction="none"
        )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(token.device)
        loss = token.sum() / num_items_in_batch
    else:
        loss = token.sum() / (flat_target != IGNORE_INDEX).sum()
    with torch.no_grad():
        per_token = token.detach()[None]
        if stats is not None:
            per_token = torch.cat([per_token, stats])
        sums, tokens = _per_example(per_token, flat_target, rows, length, cu_seq_lens)
    return loss, sums, tokens

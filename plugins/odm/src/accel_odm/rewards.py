"""Per-example loss from the training forward's own logits (no second forward).

Labels are shifted as transformers' causal-LM loss shifts them: the logit at position ``t``
predicts the label at ``t + 1``; ``-100`` labels take no loss. A padded batch has one
example per row. A padding-free batch is one packed row whose examples start at
``cu_seq_lens`` (the first label of every example is -100, so no prediction crosses two
examples); the loss of each packed segment is that example's loss.

Cost: one cross-entropy over the logits without autograd, a small fraction of a step (the
logits already exist); the fp32 upcast is done ``CHUNK`` positions at a time.
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
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, seq, vocab) and labels (batch, seq), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    rows, length = labels.shape
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])  # a view of the forward's logits
    flat_target = target.reshape(-1).to(logits.device)
    token = torch.zeros(flat_target.numel(), dtype=torch.float32, device=logits.device)
    for start in range(0, flat_target.numel(), CHUNK):  # fp32 copies of CHUNK rows at most
        end = start + CHUNK
        token[start:end] = torch.nn.functional.cross_entropy(
            flat[start:end].float(),
            flat_target[start:end],
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
    token = token.view(rows, length)
    valid = (target != IGNORE_INDEX).to(token.device)
    if cu_seq_lens is None:
        return (token * valid).sum(dim=1), valid.sum(dim=1)
    if rows != 1:
        raise ValueError(f"a packed batch has one row, got {rows}")
    bounds = cu_seq_lens.to(token.device).long()
    # the prediction at t is of token t + 1: it belongs to the example holding t + 1
    where = torch.arange(1, length + 1, device=token.device).clamp(max=length - 1)
    segment = torch.searchsorted(bounds[1:], where, right=True)
    count = bounds.numel() - 1
    sums = torch.zeros(count, device=token.device).index_add_(0, segment, token[0] * valid[0])
    tokens = torch.zeros(count, device=token.device).index_add_(0, segment, valid[0].float())
    return sums, tokens

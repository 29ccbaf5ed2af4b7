"""Per-example loss from the training forward's own logits (no second forward).

Labels are shifted as transformers' causal-LM loss shifts them: the logit at position ``t``
predicts the label at ``t + 1``; ``-100`` labels take no loss. A padded batch has one
example per row. A padding-free batch is one packed row whose examples start at
``cu_seq_lens`` (the first label of every example is -100, so no prediction crosses two
examples); the loss of each packed segment is that example's loss.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
    token = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        target.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(rows, length)
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

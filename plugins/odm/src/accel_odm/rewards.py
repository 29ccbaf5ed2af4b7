"""Per-example loss from the training forward's own logits (no second forward).

Labels are shifted as transformers' causal-LM loss shifts them: the logit at position ``t``
predicts the label at ``t + 1``; ``-100`` labels take no loss. A padded batch has one
example per row. A padding-free batch is one packed row whose examples start at
``cu_seq_lens`` (the first label of every example is -100, so no prediction crosses two
examples); the loss of each packed segment is that example's loss. The entropy rewards
use the same pass: the Shannon entropy of the predicted distribution at each labelled
position.

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
        logp = torch.log_softmax(flat[start:end].float(), dim=-1)
        tgt = flat_target[start:end]
        per_token[0, start:end] = -logp.gather(1, tgt.clamp(min=0)[:, None])[:, 0]
        if entropy:
            h = -(logp.exp() * logp).sum(dim=-1)
            per_token[1, start:end] = h
            per_token[2, start:end] = h * h
    valid = (flat_target != IGNORE_INDEX).float()
    per_token = per_token * valid
    if cu_seq_lens is None:
        example = torch.arange(rows, device=logits.device).repeat_interleave(length)
        count = rows
    else:
        if rows != 1:
            raise ValueError(f"a packed batch has one row, got {rows}")
        bounds = cu_seq_lens.to(logits.device).long()
        # the prediction at t is of token t + 1: it belongs to the example holding t + 1
        where = torch.arange(1, length + 1, device=logits.device).clamp(max=length - 1)
        example = torch.searchsorted(bounds[1:], where, right=True)
        count = bounds.numel() - 1
    sums = torch.zeros(per_token.shape[0], count, device=logits.device)
    sums.index_add_(1, example, per_token)
    tokens = torch.zeros(count, device=logits.device).index_add_(0, example, valid)
    return sums, tokens

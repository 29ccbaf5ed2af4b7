"""The model-level tests' tiny models, fixed batches and a plain AdamW loop.

Models come from ``accel.testing`` at size ``"small"`` (hidden 64, 2 layers, vocab 128, fp32,
dropouts 0) with each architecture's optional paths on (``features=True``: router logits,
Granite's multipliers, Gemma's soft-cap and tied embeddings), so that two builds of one
architecture are identical and every path a patch must keep is exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from accel import testing
from accel_fused_ops.support import ALL_MODEL_TYPES as MODEL_TYPES

__all__ = ["MODEL_TYPES", "VOCAB", "batches", "tiny_model", "train_losses"]

VOCAB = testing.SIZES["small"]["vocab_size"]


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A freshly initialised tiny model; the same ``seed`` gives the same weights."""
    return testing.tiny_model(model_type, size="small", features=True, seed=seed)


def batches(n: int = 3, batch: int = 4, seq: int = 24, seed: int = 1) -> list[dict[str, Any]]:
    """Fixed random batches; the first 5 label positions of each row are masked with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB - 4, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_losses(
    model: Any,
    data: list[dict[str, Any]],
    steps: int = 30,
    lr: float = 3e-3,
    seed: int = 123,
    after_step: Callable[[Any], None] | None = None,
) -> list[float]:
    """Loss per step of a plain AdamW loop cycling over ``data`` (RNG seeded for dropout)."""
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        out = model(**data[step % len(data)])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if after_step is not None:
            after_step(out)
    return losses

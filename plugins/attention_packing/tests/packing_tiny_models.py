"""Tiny causal LMs for the packing tests, and padded / packed batches of the same examples."""

from __future__ import annotations

import torch

from accel import testing

#: ``accel.testing``'s "small" size with room for longer examples
VOCAB = 256
_SIZE = {"vocab_size": VOCAB, "max_position_embeddings": 256}


def tiny_model(name: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """A 2-layer, hidden-64 fp32 model of architecture ``name`` with attention ``attn``."""
    return testing.tiny_model(
        name, size="small", seed=seed, attn_implementation=attn, **{**_SIZE, **overrides}
    )


def random_examples(lengths, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def padded_batch(examples, labels=None) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention_mask; labels -100 on padding."""
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e)
        mask[i, :n] = 1
        lab[i, :n] = torch.tensor(labels[i] if labels is not None else e)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of next-token prediction over tokens with a label."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != -100
    return torch.nn.functional.cross_entropy(
        shift_logits[keep], shift_labels[keep], reduction="none"
    )

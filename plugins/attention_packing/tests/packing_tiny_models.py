"""Tiny causal LMs built from configs, and padded / packed batches of the same examples."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_config(name: str, **overrides) -> transformers.PretrainedConfig:
    """Config of a 2-layer, hidden-64 model of architecture ``name``."""
    if name == "gpt_bigcode":  # MQA (one kv head), learned absolute positions
        kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256)
        kw.update(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        kw.update(overrides)
        return transformers.GPTBigCodeConfig(**kw)
    kw = dict(COMMON)
    if name == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen3":
        kw.update(head_dim=16)
    kw.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "mixtral": transformers.MixtralConfig,
        "granite": transformers.GraniteConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[name]
    return cls(**kw)


def tiny_model(name: str, attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(name, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn, dtype=torch.float32
    )
    return model


def random_examples(lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
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

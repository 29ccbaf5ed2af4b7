"""Tiny models of every supported architecture, fixed batches and a plain AdamW loop.

Shared by the model-level tests: hidden 64, 2 layers, vocab 128, fp32, dropouts 0, weights
from a fixed seed, so two builds of one architecture are identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# Tiny ops on a shared 2-core machine run several times faster on one intra-op thread than on
# two (the second thread mostly spins), and results do not depend on it.
torch.set_num_threads(1)

VOCAB = 128
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
}
_EXTRA: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True},
    "granite": {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "granitemoe": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "output_router_logits": True,
        "logits_scaling": 4.0,
    },
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "tie_word_embeddings": True, "final_logit_softcapping": 5.0},
    "gemma3_text": {"head_dim": 16, "tie_word_embeddings": True, "final_logit_softcapping": 5.0},
}
MODEL_TYPES = (*_EXTRA, "gemma3", "gpt_bigcode")


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig, Gemma3Config

    if model_type == "gpt_bigcode":
        return AutoConfig.for_model(
            "gpt_bigcode",
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if model_type == "gemma3":
        text = {k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}
        return Gemma3Config(
            text_config={**text, "head_dim": 16},
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
        )
    return AutoConfig.for_model(model_type, **{**_COMMON, **_EXTRA[model_type]})


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A freshly initialised tiny model; the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if model_type == "gemma3":
        return Gemma3ForConditionalGeneration(config).float()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


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

"""Tiny MoE models of every architecture the tests cover (built from configs, fp32, seeded)."""

from __future__ import annotations

from typing import Any

_ATTENTION = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "output_router_logits": True,  # the auxiliary loss is part of every comparison
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
}
#: per architecture: odd expert counts and widths, so nothing lines up by accident
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "head_dim": 8,
        "num_experts": 5,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
    },
    "qwen2_moe": {
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 5,
        "num_experts_per_tok": 2,
    },
    "granitemoe": {"intermediate_size": 24, "num_local_experts": 5, "num_experts_per_tok": 2},
    "granitemoeshared": {
        "intermediate_size": 24,
        "shared_intermediate_size": 40,
        "num_local_experts": 5,
        "num_experts_per_tok": 2,
    },
}
MODEL_TYPES = tuple(CONFIGS)


def moe_config(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_ATTENTION, **CONFIGS[model_type], **overrides})


def moe_model(model_type: str, seed: int = 0, **overrides: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        moe_config(model_type, **overrides), dtype=torch.float32
    )


def save_moe_model(directory: Any, model_type: str = "mixtral", **overrides: Any) -> Any:
    """A tiny MoE model and the demo tokenizer, saved for ``accel.train``."""
    from accel.testing import tiny_tokenizer

    moe_model(model_type, **overrides).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory

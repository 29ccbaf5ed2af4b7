"""Tiny saved models (with the demo tokenizer) and a dataset of identifiable examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {}),
}


def save_tiny_model(arch: str, root: Path) -> Path:
    import transformers

    from accel.trainer.demo import build_tokenizer

    config_name, model_name, extra = ARCH_CONFIGS[arch]
    if arch == "gpt_bigcode":
        config = transformers.GPTBigCodeConfig(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        config = getattr(transformers, config_name)(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=False,
            **extra,
        )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    path = root / arch
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def identifiable_examples(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Example i starts with tokens (2, 4 + i // 50, 4 + i % 50): its identity survives packing."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        body = [rng.randrange(4, 60) for _ in range(rng.choice([2, 3, 5, 8, 13, 21, 30]))]
        ids = [2, 4 + i // 50, 4 + i % 50, *body, 3]
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def identity(input_ids: list[int]) -> int:
    return (input_ids[1] - 4) * 50 + (input_ids[2] - 4)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

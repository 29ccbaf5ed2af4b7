"""Tiny real models for tests and demos: built from a config, saved with a local tokenizer.

Plugins and their tests need small but genuine transformers models (no mocks, no download);
this builds them the same way everywhere. The tokenizer is the demo's word-level one
(``accel.trainer.demo.build_tokenizer``), whose ids fit the default ``vocab_size`` of 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def tiny_config(model_type: str = "llama", **overrides: Any) -> Any:
    """A 2-layer config of ``model_type`` (hidden 32, 4 heads, 2 kv heads, dropout off)."""
    from transformers import AutoConfig

    if model_type == "gpt_bigcode":
        base = {
            "vocab_size": 64,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    else:
        base = {
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
        }
    return AutoConfig.for_model(model_type, **{**base, **SPECIAL_IDS, **overrides})


def tiny_model(model_type: str = "llama", *, seed: int = 0, **overrides: Any) -> Any:
    """A freshly initialised causal LM of ``tiny_config(model_type, **overrides)``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))


def save_tiny_model(directory: str | Path, model_type: str = "llama", **overrides: Any) -> Path:
    """Save ``tiny_model(...)`` and the demo tokenizer to ``directory``; return it."""
    from .trainer.demo import build_tokenizer

    directory = Path(directory)
    tiny_model(model_type, **overrides).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory

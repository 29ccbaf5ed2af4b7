"""Tiny real models for tests and demos: built from a config, saved with a local tokenizer.

Plugins and their tests need small but genuine transformers models (no mocks, no download);
this builds them the same way everywhere. A config is assembled from three tables and the
caller's overrides (the overrides win over all three, a size's special ids over an
architecture's):

1. ``SIZES[size]``: the dimensions, in Llama's names (translated for GPTBigCode). ``"tiny"``
   (hidden 32, vocab 64) fits the word-level tokenizer of the cipher task
   (:func:`tiny_tokenizer`) and its special ids; ``"small"`` (hidden 64,
   vocab 128) keeps each architecture's default special ids.
2. ``ARCHITECTURES[model_type]``: what every tiny model of that architecture needs (dropout
   off, a few experts instead of eight, the head size that follows from the dimensions).
3. ``FEATURES[model_type]`` with ``features=True``: the architecture's optional paths switched
   on (router aux loss, Granite's multipliers, Gemma's soft-cap and tied embeddings, Phi3's
   partial rotary, SmolLM3's NoPE layers), which a patch or kernel has to preserve.

Models are built in fp32 from ``torch.manual_seed(seed)``: the same arguments give the same
weights. The cipher task (:data:`CIPHER`, :data:`TEMPLATE`) is the one the demo trains; the
demo (:mod:`accel.trainer.demo`) builds its model and tokenizer from here.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

#: the cipher task: each letter of the input is replaced by the letter five places on
LETTERS = string.ascii_lowercase[:16]
CIPHER = dict(zip(LETTERS, LETTERS[5:] + LETTERS[:5]))
TEMPLATE = "### Input: {{input}}\n### Response: {{output}}"
RESPONSE_TEMPLATE = "### Response:"
#: the first ids of every word-level tokenizer built here, in this order
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
#: the tiny tokenizer's ids (:func:`tiny_tokenizer`)
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}

_DIMENSIONS = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        **_DIMENSIONS,
        **SPECIAL_IDS,
    },
    "small": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, **_DIMENSIONS},
}

_DECODER = {"tie_word_embeddings": False, "attention_dropout": 0.0}
#: special ids inside a tiny vocabulary, for configs whose defaults (32000, 50279, ...) lie outside
_SMALL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_EXPERTS = {"num_local_experts": 4, "num_experts_per_tok": 2}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "mixtral": {**_DECODER, **_EXPERTS},
    "granite": _DECODER,
    "granitemoe": {**_DECODER, **_EXPERTS},
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "gemma3": _DECODER,  # the text model; the vision tower is fixed (see _gemma3_config)
    "phi3": {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **_SMALL_IDS},
    "olmo2": {**_DECODER, **_SMALL_IDS},
    "smollm3": {**_DECODER, **_SMALL_IDS},
    # Granite 4 dense: attention layers only, no experts (the shared MLP is the dense MLP)
    "granitemoehybrid": {
        **_DECODER,
        **_SMALL_IDS,
        "num_local_experts": 0,
        "layer_types": ["attention", "attention"],
        "position_embedding_type": "rope",
        "shared_intermediate_size": 128,
        "mamba_n_heads": 4,  # unused without Mamba layers, but must divide 2 * hidden
    },
    "gpt_oss": {
        **_DECODER,
        **_EXPERTS,
        **_SMALL_IDS,
        "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0},
    },
    # its default bos/eos (50256) lie outside a tiny vocabulary, which transformers warns about
    "gpt_bigcode": {
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
#: configs whose head_dim defaults to a constant (128, 256) instead of hidden / heads
_EXPLICIT_HEAD_DIM = {"qwen3", "gemma2", "gemma3_text", "gemma3", "gpt_oss"}
#: GPTBigCode's names for the size keys; the others (intermediate, kv heads) do not apply
_GPT_BIGCODE_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
    **{k: k for k in SPECIAL_IDS},
}

_SOFTCAP = {"tie_word_embeddings": True, "final_logit_softcapping": 5.0}
FEATURES: dict[str, dict[str, Any]] = {
    "mixtral": {"output_router_logits": True},
    "granite": {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "granitemoe": {"output_router_logits": True, "logits_scaling": 4.0},
    "gemma2": _SOFTCAP,
    "gemma3_text": _SOFTCAP,
    "gemma3": {"tie_word_embeddings": True},
    "phi3": {"partial_rotary_factor": 0.5},
    "smollm3": {"no_rope_layer_interval": 2},  # layer 1 has no rotary embedding (NoPE)
    "granitemoehybrid": {"logits_scaling": 4.0, "residual_multiplier": 0.5},
    "gpt_oss": {"output_router_logits": True},
}

#: every architecture the builder knows
MODEL_TYPES = tuple(ARCHITECTURES)


def tiny_config(
    model_type: str = "llama", *, size: str = "tiny", features: bool = False, **overrides: Any
) -> PretrainedConfig:
    """The config of a 2-layer ``model_type`` model; see the module docstring for the tables.

    ``overrides`` use the config's own keys (Llama's size names also work for GPTBigCode); for
    ``gemma3`` they go to the text config, except the multimodal config's own keys.
    """
    from transformers import AutoConfig

    if model_type not in ARCHITECTURES:
        raise ValueError(f"no tiny {model_type!r} model; known: {', '.join(MODEL_TYPES)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}")
    settings = {**ARCHITECTURES[model_type], **SIZES[size]}  # a size's special ids win
    if model_type in _EXPLICIT_HEAD_DIM:
        settings["head_dim"] = settings["hidden_size"] // settings["num_attention_heads"]
    if features:
        settings.update(FEATURES.get(model_type, {}))
    settings.update(overrides)
    if model_type == "gpt_bigcode":
        renamed = {_GPT_BIGCODE_NAMES.get(k, k): v for k, v in settings.items()}
        dropped = set(SIZES[size]) - set(_GPT_BIGCODE_NAMES) - set(overrides)
        return AutoConfig.for_model(
            model_type, **{k: v for k, v in renamed.items() if k not in dropped}
        )
    if model_type == "gemma3":
        return _gemma3_config(settings)
    return AutoConfig.for_model(model_type, **settings)


_GEMMA3_OWN_KEYS = {
    "vision_config",
    "mm_tokens_per_image",
    "image_token_index",
    "boi_token_index",
    "eoi_token_index",
}


def _gemma3_config(settings: dict[str, Any]) -> PretrainedConfig:
    """Gemma3's image-text model: a 1-layer vision tower of 4 patches, image ids at the top."""
    from transformers import Gemma3Config

    text = {k: v for k, v in settings.items() if k not in _GEMMA3_OWN_KEYS}
    vocab = text["vocab_size"]
    own = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        "mm_tokens_per_image": 4,
        "image_token_index": vocab - 1,
        "boi_token_index": vocab - 3,
        "eoi_token_index": vocab - 2,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    own.update({k: v for k, v in settings.items() if k in _GEMMA3_OWN_KEYS})
    return Gemma3Config(text_config=text, **own)


def tiny_model(
    model_type: str = "llama",
    *,
    size: str = "tiny",
    features: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """A freshly initialised fp32 causal LM of ``tiny_config(...)`` (seeded: reproducible).

    ``gemma3`` gives ``Gemma3ForConditionalGeneration`` (what transformers loads for it).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, size=size, features=features, **overrides)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)


def save_tiny_model(directory: str | Path, model_type: str = "llama", **options: Any) -> Path:
    """Save ``tiny_model(model_type, **options)`` and the demo tokenizer to ``directory``.

    The default size (``"tiny"``) matches the tokenizer's vocabulary and special ids.
    """
    directory = Path(directory)
    tiny_model(model_type, **options).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def make_examples(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows of the cipher task (``input``: 3-10 letters, ``output``: their cipher),
    the same for the same ``seed``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        word = [rng.choice(LETTERS) for _ in range(rng.randint(3, 10))]
        rows.append({"input": " ".join(word), "output": " ".join(CIPHER[c] for c in word)})
    return rows


def word_level_tokenizer(
    words: Sequence[str], model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """A whitespace-split, word-level tokenizer over ``SPECIALS`` followed by ``words``
    (duplicates dropped); ``<s>`` starts every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        **extra,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The cipher task's tokenizer: its letters and template words (fits the ``"tiny"``
    size's vocabulary and :data:`SPECIAL_IDS`)."""
    return word_level_tokenizer([*LETTERS, "###", "Input", "Response", ":"])


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "values"
) -> None:
    """Max ``|actual - expected|`` <= ``rel`` * max ``|expected|``, same dtype and shape.

    The check for low precision (bf16, fp16): a kernel that rounds once where the reference
    rounds at every step differs by about an ulp of the largest values, which elementwise
    relative tolerances would misreport on entries near zero.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rel * scale, (
        f"{what} {tuple(expected.shape)}: max |diff| {err:.3g} > {rel} * {scale:.3g}"
    )


def cipher_run_args(model_dir: str | Path, data_path: str | Path, **overrides: Any) -> dict:
    """Trainer arguments of a short, deterministic run on the cipher task (rows from
    ``make_examples`` written as JSONL at ``data_path``); ``overrides`` win."""
    return {
        "model_name_or_path": str(model_dir),
        "training_data_path": str(data_path),
        "data_formatter_template": TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
        "max_seq_length": 48,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 7,
        **overrides,
    }

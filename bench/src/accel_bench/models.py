"""Models of ``accel bench``: names the harness builds locally from configs, or a local path.

``model_name`` is the reference's parameter; here it names a model that
:func:`accel.testing.tiny_config` (one builder for every architecture, sizes ``tiny`` and
``small``) assembles, with the bench tokenizer's vocabulary and special ids and room for long
sequences, or a larger preset (``base-*``: CPU benchmarks that take seconds per step,
``gpu-*``: hundreds of millions of parameters, for a GPU). Nothing is downloaded: weights are
random (throughput and memory do not depend on them), the tokenizer is a word-level one over
the generated datasets' vocabulary (:mod:`accel_bench.datasets`), so token counts are exact.

Each model is saved once under ``$ACCEL_CACHE/bench/models`` (atomically: built in a
temporary folder, renamed into place). GPTQ experiments need a quantized checkpoint: it is
made with ``accel quantize`` (plugin package accel-peft) from the full-precision one,
calibrated on a generated dataset, and cached beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from accel.errors import ConfigError

MODELS_VERSION = "1"
MAX_POSITIONS = 32768

_BASE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
_GPU = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
}
_QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1}

#: name -> (model_type, testing size, overrides of accel.testing's config)
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {}
for _arch, _name in (
    ("llama", "llama"),
    ("granite", "granite"),
    ("mistral", "mistral"),
    ("mixtral", "mixtral"),
    ("granitemoe", "granitemoe"),
    ("qwen3_moe", "qwen3-moe"),
    ("gpt_bigcode", "gpt-bigcode"),
):
    _extra = _QWEN3_MOE if _arch == "qwen3_moe" else {}
    PRESETS[f"tiny-{_name}"] = (_arch, "tiny", dict(_extra))
    PRESETS[f"small-{_name}"] = (_arch, "small", dict(_extra))
    if _arch in ("llama", "granite", "mixtral"):
        PRESETS[f"base-{_name}"] = (_arch, "small", {**_BASE, **_extra})
PRESETS["gpu-llama"] = ("llama", "small", dict(_GPU))
PRESETS["gpu-mixtral"] = ("mixtral", "small", {**_GPU, "num_hidden_layers": 8})

#: LoRA target modules when the entity names none (the reference hardcodes them per model)
TARGET_MODULES = {"gpt_bigcode": ["c_attn", "c_proj"]}
DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]


def cache_dir() -> Path:
    base = os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel"
    return Path(base) / "bench" / "models"


def build_tokenizer() -> Any:
    """Word-level tokenizer over the generated datasets' words; ``<s>`` starts every text."""
    from accel.testing import word_level_tokenizer

    from .datasets import NEWS_WORDS, PROMPT_WORDS, PUNCTUATION, SPECIALS

    return word_level_tokenizer(
        [*SPECIALS, *PUNCTUATION, *PROMPT_WORDS, *NEWS_WORDS], model_max_length=MAX_POSITIONS
    )


def vocab_size() -> int:
    from .datasets import NEWS_WORDS, PROMPT_WORDS, PUNCTUATION, SPECIALS

    n = len(dict.fromkeys([*SPECIALS, *PUNCTUATION, *PROMPT_WORDS, *NEWS_WORDS]))
    return (n + 63) // 64 * 64


def preset_config(name: str) -> Any:
    """The transformers config of preset ``name``."""
    from accel.testing import SIZES, SPECIAL_IDS, tiny_config

    model_type, size, overrides = PRESETS[name]
    settings = {
        "vocab_size": vocab_size(),
        "max_position_embeddings": MAX_POSITIONS,
        **SPECIAL_IDS,
        **overrides,
    }
    if model_type == "qwen3_moe":  # not in accel.testing's table: the same sizes, by hand
        from transformers import AutoConfig

        dims = {**SIZES[size], **settings}
        dims["head_dim"] = dims["hidden_size"] // dims["num_attention_heads"]
        dims["moe_intermediate_size"] = dims["intermediate_size"]
        return AutoConfig.for_model(
            "qwen3_moe", tie_word_embeddings=False, attention_dropout=0.0, **dims
        )
    return tiny_config(model_type, size=size, **settings)


def is_preset(name: str) -> bool:
    return name in PRESETS


def check_model_name(name: str) -> None:
    """A preset or a local model folder; anything else is a scenario error."""
    if name in PRESETS or (Path(name) / "config.json").is_file():
        return
    from accel.errors import did_you_mean

    raise ConfigError(
        f"model_name {name!r} is neither a bench model nor a local model folder.{did_you_mean(name, PRESETS)} "
        f"Bench models: {', '.join(PRESETS)}"
    )


def model_path(name: str, root: Path | None = None) -> Path:
    """The folder of ``name`` (built and cached on first use for a preset)."""
    if name not in PRESETS:
        check_model_name(name)
        return Path(name)
    root = Path(root) if root is not None else cache_dir()
    target = root / f"v{MODELS_VERSION}" / name
    if (target / "READY").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config(name), dtype=torch.float32)
        model.save_pretrained(staging)
        build_tokenizer().save_pretrained(staging)
        (staging / "READY").write_text(MODELS_VERSION)
        if target.exists():
            shutil.rmtree(target)  # a half-built folder of ours without READY
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "READY").is_file():  # another process did not finish it either
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def model_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def preset_model_type(name: str) -> str | None:
    return PRESETS[name][0] if name in PRESETS else None


def num_experts(name: str) -> int | None:
    """The model's expert count (``num_local_experts``, or Qwen-MoE's ``num_experts``);
    None for a dense model. Read without building the model."""
    if name in PRESETS:  # from the tables, without importing transformers
        from accel.testing import ARCHITECTURES

        model_type, _, overrides = PRESETS[name]
        cfg = {**ARCHITECTURES.get(model_type, {}), **overrides}
    else:
        cfg = model_config(name)
    for key in ("num_local_experts", "num_experts"):
        if cfg.get(key):
            return int(cfg[key])
    return None


def target_modules(name: str) -> list[str]:
    model_type = preset_model_type(name) or model_config(name).get("model_type")
    return list(TARGET_MODULES.get(str(model_type), DEFAULT_TARGET_MODULES))


def gptq_path(name: str, calibration: Path, root: Path | None = None) -> Path:
    """A 4-bit GPTQ checkpoint of ``name``, made once with ``accel quantize`` and cached."""
    source = model_path(name, root)
    hidden = int(model_config(source).get("hidden_size") or model_config(source)["n_embd"])
    group = 128 if hidden % 128 == 0 else 32
    base = Path(root) if root is not None else cache_dir()
    if name in PRESETS:
        target = base / f"v{MODELS_VERSION}" / f"{name}-gptq-4bit-g{group}"
    else:
        target = Path(str(source).rstrip("/") + f"-gptq-4bit-g{group}")
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "accel.cli",
        "quantize",
        str(source),
        str(staging),
        "--bits",
        "4",
        "--group_size",
        str(group),
        "--calibration",
        str(calibration),
        "--max_examples",
        "32",
        "--max_length",
        "256",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"accel quantize of {name} failed: {' | '.join(tail)}")
    os.replace(staging, target)
    return target

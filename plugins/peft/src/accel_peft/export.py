"""``accel export merged``: LoRA adapters trained on a 4-bit base, merged into a plain model.

The base is loaded the way it was trained (bitsandbytes 4-bit from the full-precision model, or
the GPTQ checkpoint), every quantized linear is dequantized to the training dtype, the adapters
are merged into those weights, and the result is saved as an ordinary Hugging Face checkpoint
(no quantization_config) that ``AutoModelForCausalLM`` and serving engines load. Its logits are
those of the adapters on the dequantized base.

Training writes ``BASE_FILE`` next to the adapters (the base's quantization and the training
dtype); an adapter folder without it is merged into its base as it is (plain LoRA).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.api import ConfigError

from .output import check_output_dir, staged

BASE_FILE = "accel_base_quantization.json"


def _adapter_digest(folder: Path) -> str | None:
    """SHA-256 of the adapter weights: ties the recorded base to the adapters it trained, so a
    record left beside adapters of a later run is never applied to them."""
    import hashlib

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_base_info(folder: str, info: dict[str, Any]) -> None:
    """Write ``BASE_FILE`` next to saved adapters (atomically; nothing when there are none)."""
    import os

    path = Path(folder)
    digest = _adapter_digest(path)
    if digest is None or not (path / "adapter_config.json").is_file():
        return
    tmp = path / f".{BASE_FILE}.tmp"
    tmp.write_text(json.dumps({**info, "adapter_sha256": digest}, indent=2) + "\n")
    os.replace(tmp, path / BASE_FILE)


def read_adapter(adapter_dir: str) -> tuple[str, dict[str, Any]]:
    """The base model of an adapter folder and how it was quantized for training."""
    folder = Path(adapter_dir).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"adapter_dir '{adapter_dir}' holds no adapter_config.json; pass the folder the "
            "LoRA adapters were saved to (save_model_dir of the run)"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(
            f"adapter_dir '{adapter_dir}': peft_type {config.get('peft_type')!r} cannot be "
            "merged; only LoRA adapters merge into the base weights"
        )
    base = config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{config_file} names no base_model_name_or_path")
    from accel.api import check_model_source

    check_model_source(base, f"base model (base_model_name_or_path in {config_file})")
    info_file = folder / BASE_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info and info.get("adapter_sha256") != _adapter_digest(folder):
        info = {}  # recorded for other adapters (an earlier run into the same folder)
    return base, info


def _dense_weight(module: Any, dtype: Any) -> Any:
    """The dequantized ``(out_features, in_features)`` weight of a quantized linear."""
    kind = type(module).__module__
    if kind.startswith("bitsandbytes"):
        from bitsandbytes.functional import dequantize_4bit

        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("bitsandbytes weight is in its CPU inference layout")
        return dequantize_4bit(module.weight.data, state).to(dtype)
    return module.dequantize_weight().t().to(dtype)  # gptqmodel layers store (in, out)


def dequantized_base(base: str, info: dict[str, Any], dtype: Any = None) -> Any:
    """The base model as training saw it, with plain ``nn.Linear`` layers holding the
    dequantized weights, in ``dtype`` (default: the training dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import is_quantized_linear
    from .loading import load_bnb_4bit, load_gptq, quant_method, resolve_dtype

    dtype = (
        dtype or getattr(torch, info.get("torch_dtype", ""), None) or resolve_dtype(base, "auto")
    )
    method = quant_method(base)
    if method == "gptq":
        quantized = load_gptq(base, {"dtype": dtype})
    elif info.get("method") == "bitsandbytes":
        quantized = load_bnb_4bit(base, {"dtype": dtype}, info.get("quant_type", "nf4"))
    elif method is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    else:
        raise ConfigError(
            f"base model '{base}' is quantized with '{method}', which cannot be merged"
        )
    quantized.train()  # bitsandbytes repacks CPU weights for inference on an eval forward
    config = AutoConfig.from_pretrained(base)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, Any] = {}
    for name, module in quantized.named_modules():
        if is_quantized_linear(module):
            state[f"{name}.weight"] = _dense_weight(module, dtype)
            if getattr(module, "bias", None) is not None:
                state[f"{name}.bias"] = module.bias.detach().to(dtype)
            continue
        for key, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            full = f"{name}.{key}" if name else key
            state[full] = tensor.detach()
    wanted = plain.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"dequantized base lacks {missing[:5]}")
    plain.load_state_dict({k: state[k].to(wanted[k].dtype) for k in wanted})
    plain.tie_weights()
    plain.eval()
    return plain


def merged_model(adapter_dir: str, dtype: Any = None) -> Any:
    from .adapters import load_adapters

    base, info = read_adapter(adapter_dir)
    model = load_adapters(dequantized_base(base, info, dtype), adapter_dir, dtype)
    return model.merge_and_unload()


def export_merged(adapter_dir: str, output_dir: str, dtype: Any = None) -> Path:
    """Write the merged model (and the adapters' tokenizer) to ``output_dir``, atomically."""
    base, _ = read_adapter(adapter_dir)
    target = check_output_dir(output_dir)
    model = merged_model(adapter_dir, dtype)
    from transformers import AutoTokenizer

    source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(source)
    with staged(target) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    return target

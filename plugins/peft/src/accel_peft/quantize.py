"""``accel quantize``: a local model to a GPTQ checkpoint with gptqmodel, calibrated on a
local data file (no hub access), on CPU or one GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accel.api import ConfigError

from .loading import check_bits, quant_method
from .output import check_output_dir, staged
from .packages import require


def calibration_texts(path: str, limit: int) -> list[str]:
    """Texts from a .txt (one per line) or .json/.jsonl file (a ``text`` field, else the row's
    string values joined)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--calibration '{path}' is not a file; pass a .txt, .json or .jsonl")
    if file.suffix == ".txt":
        texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    elif file.suffix in (".json", ".jsonl"):
        text = file.read_text()
        try:
            rows = (
                json.loads(text)
                if file.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as err:
            raise ConfigError(f"--calibration '{path}': not valid JSON ({err})") from None
        texts = [_row_text(row) for row in rows if isinstance(row, dict)]
        texts = [t for t in texts if t]
    else:
        raise ConfigError(
            f"--calibration '{path}': expected a .txt, .json or .jsonl file, got '{file.suffix}'"
        )
    if not texts:
        raise ConfigError(f"--calibration '{path}' holds no text examples")
    return texts[:limit]


def _row_text(row: dict[str, Any]) -> str:
    if isinstance(row.get("text"), str):
        return row["text"]
    return " ".join(v for v in row.values() if isinstance(v, str))


def check_source(model_dir: str) -> None:
    from accel.api import check_model_source

    check_model_source(model_dir, "model_dir")
    method = quant_method(model_dir)
    if method is not None:
        raise ConfigError(
            f"model_dir '{model_dir}' is already quantized (quant_method '{method}'); pass the "
            "full-precision model"
        )


def quantize(
    model_dir: str,
    output_dir: str,
    *,
    bits: int = 4,
    group_size: int = 128,
    calibration: str,
    max_examples: int = 128,
    max_length: int = 512,
    batch_size: int = 4,
) -> Path:
    """Quantize ``model_dir`` to ``output_dir``; every input is checked before the model loads."""
    check_bits(bits, group_size, "accel quantize")
    check_source(model_dir)
    target = check_output_dir(output_dir)
    texts = calibration_texts(calibration, max_examples)
    require("gptq", "accel quantize")

    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    if (os.cpu_count() or 1) <= 2 and hasattr(gptqmodel, "_default_cpu_workers"):
        # its CPU pool asks for 2 workers but counts only 1 on a 2-core machine
        gptqmodel._default_cpu_workers = lambda: 2
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=max_length)
        examples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = QuantizeConfig(bits=bits, group_size=group_size)
    model = GPTQModel.load(model_dir, config, device=device)
    _quantize_logging_into(_cache_dir() / "gptq-logs")
    model.quantize(examples, batch_size=batch_size)
    with staged(target) as staging:
        model.save(str(staging))
        tokenizer.save_pretrained(str(staging))
    return target


def _cache_dir() -> Path:
    return Path(os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel")


def _quantize_logging_into(folder: Path) -> None:
    """gptqmodel writes a per-layer log file under ``./logs`` of the working directory (written
    in the background, so it must outlive the call); keep the user's folder clean by pointing
    it into accel's cache instead."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:
        return
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = folder

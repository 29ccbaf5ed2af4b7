"""Helpers of the accel-peft tests: run arguments, a batch, model snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LORA_MARK = "lora_"


def run_args(root: Path, model: Path, name: str, **extra: Any) -> dict[str, Any]:
    """``accel.train`` arguments of a short LoRA run on the cipher task."""
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    args: dict[str, Any] = {
        "model_name_or_path": str(model),
        "training_data_path": str(root / "train.jsonl"),
        "data_formatter_template": TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
        "output_dir": str(root / f"out-{name}"),
        "save_model_dir": str(root / f"save-{name}"),
        "max_seq_length": 48,
        "per_device_train_batch_size": 8,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "peft_method": "lora",
        "target_modules": ["all-linear"],
        "lora_dropout": 0.0,
    }
    args.update(extra)
    return args


def losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


def batch(vocab: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (4, 16), generator=gen)


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of the model (packed quantized weights included), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if LORA_MARK not in k}


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if LORA_MARK in k}


def prepared_model(flags: dict[str, list[Any]], model: Path, dtype: torch.dtype, **train: Any):
    """The model after the plugin's load_model and augment_model hooks, as a run builds it."""
    import peft
    from transformers import TrainingArguments

    from accel import AccelerationFramework
    from accel.trainer.loading import default_loader

    framework = AccelerationFramework.from_sources(flags=flags)
    loaded = framework.load_model(str(model), default=default_loader, dtype=dtype)
    args = TrainingArguments(str(model.parent / "hooks-out"), report_to=[], **train)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model, left = framework.augment_model(loaded, args, config)
    assert left is None  # the plugin applied the adapters
    return peft_model, args


def train_steps(model: torch.nn.Module, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one batch (lora_B starts at zero: the first step moves it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    x = batch()
    model.train()
    out = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.item())
    return out


def train_argv(root: Path, model: Path, *extra: str) -> list[str]:
    """``accel train`` command-line arguments of a short LoRA run."""
    return [
        "train",
        "--model_name_or_path", str(model),
        "--training_data_path", str(root / "train.jsonl"),
        "--data_formatter_template", "### Input: {{input}}\n### Response: {{output}}",
        "--response_template", "### Response:",
        "--output_dir", str(root / "out-cli"),
        "--max_seq_length", "48",
        "--per_device_train_batch_size", "8",
        "--max_steps", "2",
        "--save_strategy", "no",
        "--disable_tqdm", "True",
        "--peft_method", "lora",
        "--target_modules", "all-linear",
        *extra,
    ]  # fmt: skip

"""Checks of a run's arguments that need no model: run first, so a bad value, path or data file
is one clear error in a second rather than a traceback after the model has loaded.

Values are checked against the range they make sense in (a batch size of 0 or a negative
learning rate is accepted by transformers and fails later, or trains nothing); paths must be
folders that can be created and written; data files are read through by
:func:`accel.trainer.data.check_data_file`; a local model folder by
:func:`accel.trainer.loading.check_model_source`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, Problems, did_you_mean

if TYPE_CHECKING:
    from .parsing import TrainConfig

# (section of TrainConfig, key, test, what the value must be); None values are not checked
RANGES: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("training", "learning_rate", lambda v: v >= 0, ">= 0 (e.g. 2e-5)"),
    ("training", "per_device_train_batch_size", lambda v: v >= 1, "at least 1"),
    ("training", "per_device_eval_batch_size", lambda v: v >= 1, "at least 1"),
    ("training", "gradient_accumulation_steps", lambda v: v >= 1, "at least 1"),
    ("training", "max_steps", lambda v: v == -1 or v >= 1, "at least 1, or -1 (use epochs)"),
    ("training", "num_train_epochs", lambda v: v > 0, "> 0"),
    ("training", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("training", "max_grad_norm", lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    ("training", "save_steps", lambda v: v > 0, "> 0"),
    ("training", "eval_steps", lambda v: v > 0, "> 0"),
    ("training", "dataloader_num_workers", lambda v: v >= 0, ">= 0"),
    ("data", "max_seq_length", lambda v: v >= 1, "at least 1 token"),
    ("tuning", "r", lambda v: v >= 1, "at least 1 (the LoRA rank, e.g. 8)"),
    ("tuning", "lora_alpha", lambda v: v > 0, "> 0 (e.g. 16 or 32)"),
    ("tuning", "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.05)"),
    ("tuning", "num_virtual_tokens", lambda v: v >= 1, "at least 1"),
)
_ONLY_FOR = {  # keys that matter only for some peft methods
    "r": ("lora", "alora"),
    "lora_alpha": ("lora", "alora"),
    "lora_dropout": ("lora", "alora"),
    "num_virtual_tokens": ("pt",),
}


def check_before_loading(config: TrainConfig, problems: Problems | None = None) -> None:
    """Every check that needs no model, in the order a user would fix them. The checks do not
    depend on each other (a missing model or dataset skips only the checks of that), so every
    problem is reported at once: into ``problems``, else raised here."""
    from .loading import check_model_source, check_tokenizer_source

    found = Problems() if problems is None else problems
    before = len(found.errors)
    found.check(check_required, config)
    complete = len(found.errors) == before
    found.check(check_values, config)
    found.check(check_attention, config.model.attn_implementation)
    found.check(check_report_to, config.training.report_to)
    found.check(check_output_dir, config.training.output_dir)
    if complete:
        found.check(check_data, config)
        before = len(found.errors)
        found.check(check_model_source, config.model.model_name_or_path)
        if len(found.errors) == before:  # the tokenizer defaults to the model's folder
            found.check(check_tokenizer_source, config)
    if problems is None:
        found.raise_any()


def check_required(config: TrainConfig) -> None:
    missing = Problems()
    if not config.model.model_name_or_path:
        missing.errors.append(
            ConfigError(
                "model_name_or_path is required (or pass --demo for the embedded tiny model)"
            )
        )
    if not config.data.training_data_path and not config.data.data_config:
        missing.errors.append(
            ConfigError(
                "training_data_path is required, or data_config for several datasets (or pass "
                "--demo for the embedded dataset)"
            )
        )
    missing.raise_any()
    args = config.training
    if args.eval_strategy != "no" and not _has_validation(config):
        raise ConfigError(
            f"eval_strategy is '{args.eval_strategy.value}' but there is no validation data; "
            "set validation_data_path or eval_strategy 'no'"
        )


def check_values(config: TrainConfig) -> None:
    method = config.tuning.peft_method
    for section, key, ok, must in RANGES:
        if method not in _ONLY_FOR.get(key, (method,)):
            continue
        value = getattr(getattr(config, section), key, None)
        if value is None:
            continue
        if key == "save_steps" and config.training.save_strategy != "steps":
            continue
        if key == "eval_steps" and config.training.eval_strategy != "steps":
            continue
        if key == "num_train_epochs" and config.training.max_steps > 0:
            continue
        if not ok(value):
            raise ConfigError(f"{key} is {value!r}; it must be {must}")


def check_attention(name: str | None) -> None:
    """A known attention implementation, or a hub kernel (``org/name``) left to transformers."""
    if name is None or "/" in name:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known:
        raise ConfigError(
            f"attn_implementation '{name}' is not known to transformers.{did_you_mean(name, known)}"
            f" Known: {', '.join(known)}, or a hub kernel such as 'kernels-community/flash-attn'."
        )


def check_report_to(report_to: Any) -> None:
    """Logging integrations are looked up when the Trainer is built, after the model loads."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = ["all", "none", *INTEGRATION_TO_CALLBACK]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"report_to '{name}' is not a logging integration of transformers."
                f"{did_you_mean(name, known)} Known: {', '.join(known)}."
            )


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """``path`` is a folder, or can be created as one, and can be written."""
    if not str(path).strip():
        raise ConfigError(f"{key} is empty; pass the folder for checkpoints and logs")
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key} '{path}' is a file; pass a folder (it is created if missing)")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be created: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == target else f" (its nearest existing folder '{existing}' is not)"
        raise ConfigError(f"{key} '{path}' is not writable{where}; pass a folder you can write to")


def _has_validation(config: TrainConfig) -> bool:
    if config.data.validation_data_path:
        return True
    if not config.data.data_config:
        return False
    from .datamix import read_data_config

    return read_data_config(config.data.data_config).has_validation


def check_data(config: TrainConfig) -> None:
    from .data import check_data_file
    from .datamix import check_data_config

    if config.data.data_config:
        check_data_config(config)
    else:
        check_data_file(config.data.training_data_path, "training_data_path", config.data)
    if config.data.validation_data_path:
        check_data_file(config.data.validation_data_path, "validation_data_path", config.data)

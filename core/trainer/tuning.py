"""PEFT configuration from fms-hf-tuning's tuning arguments."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .arguments import TuningArguments


def resolve_target_modules(targets: list[str]) -> str | list[str]:
    """``all-linear`` means every linear layer but the output layer (PEFT's own rule);
    ``lm_head`` named explicitly (alone or next to ``all-linear``) adapts the output layer too."""
    if "all-linear" not in targets:
        return list(targets)
    rest = [t for t in targets if t != "all-linear"]
    if not rest:
        return "all-linear"
    if rest == ["lm_head"]:
        return ["all-linear-with-lm-head"]  # expanded by expand_all_linear below
    raise ConfigError(
        f"target_modules: 'all-linear' can only be combined with 'lm_head', got {targets}"
    )


def expand_all_linear(model: Any, targets: str | list[str]) -> str | list[str]:
    """Expand the internal marker for ``all-linear`` + ``lm_head`` into explicit module names."""
    if targets != ["all-linear-with-lm-head"]:
        return targets
    import torch

    names = {
        name.split(".")[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    return sorted(names | {"lm_head"})


def build_peft_config(model: Any, tokenizer: Any, tuning: TuningArguments) -> Any | None:
    """Return the PEFT config for ``tuning.peft_method`` (None for full fine-tuning)."""
    method = tuning.peft_method
    if method == "none":
        return None
    import peft

    if method in ("lora", "alora"):
        targets = expand_all_linear(model, resolve_target_modules(tuning.target_modules))
        kwargs: dict[str, Any] = {}
        if method == "alora":
            if not tuning.invocation_string:
                raise ConfigError(
                    "peft_method 'alora' needs --invocation_string (the text that activates the adapter)"
                )
            kwargs["alora_invocation_tokens"] = tokenizer.encode(
                tuning.invocation_string, add_special_tokens=False
            )
        elif tuning.invocation_string:
            raise ConfigError("invocation_string is only used with peft_method 'alora'")
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=tuning.r,
            lora_alpha=tuning.lora_alpha,
            lora_dropout=tuning.lora_dropout,
            target_modules=targets,
            **kwargs,
        )
    # prompt tuning
    init = (
        peft.PromptTuningInit.TEXT
        if tuning.prompt_tuning_init_text
        else peft.PromptTuningInit.RANDOM
    )
    return peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tuning.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=tuning.prompt_tuning_init_text,
        tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None)
        if tuning.prompt_tuning_init_text
        else None,
    )

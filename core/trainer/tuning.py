"""PEFT configuration from fms-hf-tuning's tuning arguments."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError, did_you_mean
from .arguments import TuningArguments

logger = logging.getLogger("accel")


def linear_layer_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers (nn.Linear, GPT-2's Conv1D, and
    quantized linears, which all carry ``Linear`` in their class name)."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name
            and (
                isinstance(module, torch.nn.Linear)
                or type(module).__name__ in ("Conv1D",)
                or "Linear" in type(module).__name__
            )
        }
    )


def resolve_target_modules(targets: list[str], model: Any = None) -> str | list[str]:
    """fms-hf-tuning's rule: ``all-linear`` selects every linear layer except the output layer,
    and a list holding ``all-linear`` means all-linear alone; ``lm_head`` is tuned only when
    named explicitly without ``all-linear``. Names ignored next to all-linear are warned about."""
    if "all-linear" not in targets:
        return list(targets)
    ignored = [t for t in targets if t != "all-linear"]
    if ignored:
        layers = [n for n in linear_layer_names(model) if n != "lm_head"] if model else []
        example = (
            " ".join([*layers, "lm_head"]) if layers else "q_proj k_proj v_proj o_proj lm_head"
        )
        logger.warning(
            "target_modules: 'all-linear' selects every linear layer except the output layer and "
            "overrides the other names, so %s %s ignored (lm_head is not tuned). To tune lm_head "
            "too, list every layer by name instead: --target_modules %s",
            ", ".join(repr(t) for t in ignored),
            "is" if len(ignored) == 1 else "are",
            example,
        )
    return "all-linear"


def check_targets_exist(model: Any, targets: list[str]) -> None:
    """Every name in ``targets`` must match a module the way PEFT matches (the full name, or
    its ending after a dot); PEFT itself only fails when *no* name matches."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not unmatched:
        return
    layers = linear_layer_names(model)
    hint = did_you_mean(unmatched[0], layers)
    raise ConfigError(
        f"target_modules {', '.join(repr(t) for t in unmatched)} "
        f"{'matches' if len(unmatched) == 1 else 'match'} no module of "
        f"{type(model).__name__}.{hint} Its linear layers are: {', '.join(layers)} "
        "(or use 'all-linear')."
    )


def build_peft_config(model: Any, tokenizer: Any, tuning: TuningArguments) -> Any | None:
    """Return the PEFT config for ``tuning.peft_method`` (None for full fine-tuning)."""
    method = tuning.peft_method
    if method == "none":
        return None
    import peft

    if method in ("lora", "alora"):
        if not tuning.target_modules:
            raise ConfigError(
                "target_modules is empty; name the layers to adapt (e.g. q_proj v_proj) or "
                "pass 'all-linear'"
            )
        targets = resolve_target_modules(tuning.target_modules, model)
        if isinstance(targets, list):
            check_targets_exist(model, targets)
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

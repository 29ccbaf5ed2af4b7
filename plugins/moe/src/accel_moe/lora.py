"""LoRA on expert weights and routers: PEFT's ``target_parameters``, found on the model.

Expert weights are 3-D parameters, not linear layers, so ``target_modules`` cannot reach them;
PEFT wraps a named parameter instead (``lora.ParamWrapper``), and the experts forward reads
``W + BA`` through it. The adapter saved that way is a vanilla PEFT adapter.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from accel import ConfigError

_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def moe_parameter_names(model: Any, experts: bool, router: bool) -> list[str]:
    """Fully qualified names of the expert weights and the router weights of every MoE block."""
    names: list[str] = []
    for path, module in model.named_modules():
        if not hasattr(module, "_is_expert_parallel"):  # set by @use_experts_implementation
            continue
        if experts:
            own = dict(module.named_parameters(recurse=False))
            names += [f"{path}.{p}" for p in _EXPERT_WEIGHTS if p in own]
        if router:
            parent_path, _, experts_name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            prefix = f"{parent_path}." if parent_path else ""
            for child_name, child in parent.named_children():
                weight = getattr(child, "weight", None)
                if (
                    child_name != experts_name
                    and isinstance(weight, torch.Tensor)
                    and weight.dim() == 2
                    and weight.shape[0] == module.num_experts
                ):
                    names.append(f"{prefix}{child_name}.weight")
    return names


def add_moe_targets(model: Any, peft_config: Any, experts: bool, router: bool) -> Any:
    """``peft_config`` with the MoE parameters added to ``target_parameters``."""
    if not hasattr(peft_config, "target_parameters"):
        raise ConfigError(
            f"lora_experts / lora_router need a LoRA config, not {type(peft_config).__name__}"
        )
    names = moe_parameter_names(model, experts, router)
    if not names:
        raise ConfigError(
            f"lora_experts / lora_router: no expert or router weights found in "
            f"{type(model).__name__}"
        )
    existing = list(peft_config.target_parameters or [])
    peft_config = copy.copy(peft_config)
    peft_config.target_parameters = existing + [n for n in names if n not in existing]
    return peft_config

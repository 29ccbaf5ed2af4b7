"""Expert parallelism on transformers' own engine, and the checks that keep it honest.

``--fast_moe N`` loads the model with ``DistributedConfig(ep_size=N, fsdp_size=...)``:
transformers shards the experts over N processes and exchanges the routed tokens with
all-to-all; the dense parameters are FSDP2-sharded over the FSDP dimension (``fsdp_size``
when given, else every process), which the engine requires (``ep_size`` must divide
``fsdp_size``). Nothing here exchanges tokens or shards anything itself.
"""

from __future__ import annotations

import os
from typing import Any

from accel.api import ConfigError

#: config attributes that hold the number of routed experts, by architecture family
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_launch(ep_size: int) -> None:
    """Before anything loads: the launch can hold ``ep_size`` expert shards."""
    world = world_size()
    if ep_size <= 1:
        return
    if world == 1:
        raise ValueError(
            f"ep_degree {ep_size} (expert parallelism) needs a distributed launch of a multiple "
            f"of {ep_size} processes, e.g. `torchrun --nproc_per_node {ep_size} -m accel.cli "
            f"train ... --fast_moe {ep_size}`; use --fast_moe True to train in one process"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ValueError(
            f"ep_degree {ep_size}: expert parallelism loads the model with transformers' own "
            "FSDP2 (sharded at load time); drop the accelerate FSDP config, or use --fast_moe "
            "True to keep accelerate's FSDP"
        )
    if world % ep_size:
        raise ValueError(
            f"ep_degree {ep_size} does not divide the number of processes ({world}); choose an "
            f"ep_degree that divides {world}"
        )


def expert_count(model_config: Any) -> int | None:
    config = getattr(model_config, "text_config", None) or model_config
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(model_config: Any, ep_size: int) -> None:
    """Before the weights load: the experts split evenly over ``ep_size`` processes."""
    if ep_size <= 1:
        return
    experts = expert_count(model_config)
    if experts is None:
        raise ConfigError(
            f"--fast_moe {ep_size}: cannot tell how many experts {type(model_config).__name__} "
            "has; expert parallelism needs it to divide the experts"
        )
    if experts % ep_size:
        raise ConfigError(
            f"--fast_moe {ep_size}: the model has {experts} experts per layer, which "
            f"{ep_size} processes cannot share evenly; choose an ep_degree that divides {experts}"
        )


def distributed_config(ep_size: int, replicate_experts: bool, current: Any) -> Any:
    """The ``distributed_config`` to load with: ``current`` (the core's, from ``fsdp_size``)
    extended with ``ep_size``; ``None`` when neither asks for one."""
    if replicate_experts and current is not None:
        raise ConfigError(
            "--fast_moe False keeps every expert whole on every process, but fsdp_size shards "
            "every parameter at load time; use --fast_moe True (experts sharded with the rest) "
            "or --fast_moe N (expert parallelism), or drop fsdp_size"
        )
    if ep_size <= 1:
        return current
    from transformers.distributed import DistributedConfig

    world = world_size()
    fsdp = getattr(current, "fsdp_size", None) or world
    if fsdp % ep_size:
        raise ConfigError(
            f"--fast_moe {ep_size}: the expert-parallel degree must divide fsdp_size ({fsdp}); "
            f"set fsdp_size to a multiple of {ep_size} or leave it unset"
        )
    return DistributedConfig(
        fsdp_size=fsdp,
        dp_replicate_size=world // fsdp,
        ep_size=ep_size,
        ep_implementation="all_to_all",
    )


def check_sharded(model: Any, ep_size: int) -> None:
    """After loading: the experts really are split (each process holds 1/ep_size of them)."""
    experts = expert_count(model.config)
    for name, module in model.named_modules():
        if not hasattr(module, "_is_expert_parallel") or not hasattr(module, "num_experts"):
            continue
        if not module._is_expert_parallel or module.num_experts * ep_size != experts:
            raise ConfigError(
                f"--fast_moe {ep_size}: '{name}' holds {module.num_experts} of {experts} experts "
                "after loading; expert parallelism did not engage (a plugin that loads the model "
                "may not pass distributed_config)"
            )
        return
    raise ConfigError(f"--fast_moe {ep_size}: the model has no experts module to shard")


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0) -> Any:
    """``torch.nn.utils.clip_grad_norm_`` for a hand-written loop over a model sharded at load
    time. Under expert parallelism the gradients live on several device meshes (experts on the
    expert mesh, dense weights on the FSDP mesh, PEFT adapters as plain replicated tensors),
    and torch's function cannot combine norms of DTensors of different meshes. Here each
    mesh's norm is reduced over its own mesh first; the total, the same on every process, is
    the norm of all gradients of the whole model, and every gradient is clipped by it (what
    the Trainer does for such models). Returns the total norm as a plain tensor."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups: dict[Any, list[Any]] = {}
    for param in parameters:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    norms = []
    for group in groups.values():
        norm = get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    for group in groups.values():
        clip_grads_with_norm_(group, max_norm, total)
    return total

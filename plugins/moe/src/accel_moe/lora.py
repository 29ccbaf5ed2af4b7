"""LoRA on expert weights and routers: PEFT's ``target_parameters``, found on the model.

Expert weights are 3-D parameters, not linear layers, so ``target_modules`` cannot reach them;
PEFT wraps a named parameter instead (``lora.ParamWrapper``), and the experts forward reads
``W + BA`` through it. The adapter saved that way is a vanilla PEFT adapter.

Under expert parallelism PEFT's fold cannot work on the sharded experts; the expert factors
are sharded like the experts and folded by the ScatterMoE forward instead (see
:func:`shard_expert_lora`), and the adapter is still saved as a vanilla PEFT adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch

from accel.api import ConfigError

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
            # the router scores every expert: under EP the module holds only its own
            # (``num_experts`` is local), but a sharded weight's shape is the global one
            weights = [getattr(module, p, None) for p in _EXPERT_WEIGHTS]
            count = next((w.shape[0] for w in weights if isinstance(w, torch.Tensor)), None)
            count = count or module.num_experts
            parent_path, _, experts_name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            prefix = f"{parent_path}." if parent_path else ""
            for child_name, child in parent.named_children():
                weight = getattr(child, "weight", None)
                if (
                    child_name != experts_name
                    and isinstance(weight, torch.Tensor)
                    and weight.dim() == 2
                    and weight.shape[0] == count
                ):
                    names.append(f"{prefix}{child_name}.weight")
    return names


def add_moe_targets(model: Any, peft_config: Any, experts: bool, router: bool) -> Any:
    """``peft_config`` with the MoE parameters added to ``target_parameters``."""
    if not hasattr(peft_config, "target_parameters"):
        raise ConfigError(
            f"lora_experts / lora_router need a LoRA config, not {type(peft_config).__name__}"
        )
    check_lora_config(peft_config)
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


def check_lora_config(peft_config: Any) -> None:
    """PEFT's LoRA on parameters (``ParamWrapper``) has no dropout, bias or DoRA: say so in one
    line instead of PEFT's traceback at wrapping time."""
    if getattr(peft_config, "lora_dropout", 0.0):
        raise ConfigError(
            f"lora_experts / lora_router: PEFT's LoRA on expert and router weights has no dropout "
            f"(lora_dropout is {peft_config.lora_dropout}); set lora_dropout 0"
        )
    for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if getattr(peft_config, option, False):
            raise ConfigError(f"lora_experts / lora_router do not work with {option}")


# --- expert parallelism -----------------------------------------------------------------------
#
# Under transformers' EP each process holds ``num_experts / ep`` experts as DTensors on the
# ``ep`` mesh, and PEFT's ParamWrapper would fold full-size factors into the sharded weight
# through a parametrization (``aten.baddbmm ... got mixed torch.Tensor and DTensor``). Here the
# factors of every expert weight become DTensors sharded like the experts (each process keeps
# the rows/columns of its own experts), and the ParamWrapper hands its local factors to the
# ScatterMoE experts forward, which folds them into the local expert weights. The parameters
# keep PEFT's names and shapes, and the adapter saved after gathering is a vanilla PEFT adapter.
#
# PEFT's layout (peft/tuners/lora/layer.py, ParamWrapper.update_layer / get_delta_factors):
# ``lora_A.weight`` is (r * E, in) with row ``e * r + i``: experts are contiguous, Shard(0).
# ``lora_B.weight`` is (out, r * E) with column ``i * E + e``: experts interleaved, which only
# a strided placement could shard, and DCP (the sharded Trainer checkpoints) cannot write one.
# So while sharded, lora_B holds its columns expert-major (``e * r + i``) and is Shard(1);
# PEFT's order is restored when the adapter is saved (:func:`peft_order_of_b`). The
# expert-major order does not depend on the process count, so a DCP checkpoint of it reshards.

#: attribute of the experts module holding the local LoRA factors during its forward
LORA_FACTORS = "_accel_lora_factors"


def _expert_wrappers(model: Any) -> list[tuple[Any, Any]]:
    """``(ParamWrapper, experts module)`` for every PEFT wrapper of an expert-parallel weight."""
    from peft.tuners.lora.layer import ParamWrapper

    found = []
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            base = module.get_base_layer()
            if getattr(base, "_is_expert_parallel", False):
                found.append((module, base))
    return found


class _ExpertFactorGrad(torch.autograd.Function):
    """Identity forward; backward sums the local factor gradient over the processes that hold
    the same experts (other EP groups, when there are more processes than ``ep``) and divides
    it by the data-parallel degree, as transformers does for the expert weights themselves
    (``set_gradient_divide_factor(dp_size)``): the owner's gradient already covers the tokens
    every process of its EP group routed to it."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, group: Any, divide: float) -> torch.Tensor:
        ctx.group, ctx.divide = group, divide
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.group is not None:
            import torch.distributed as dist

            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad / ctx.divide, None, None


def _replica_group(ep_mesh: Any) -> Any:
    """The process group of the processes that hold this process's experts (``None`` when this
    one is alone with them). Every process takes part in creating every group."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == ep_mesh.size():
        return None
    coordinate = torch.tensor([ep_mesh.get_local_rank()])
    coordinates = [torch.zeros_like(coordinate) for _ in range(world)]
    dist.all_gather(coordinates, coordinate)
    mine = None
    for c in range(ep_mesh.size()):
        group = dist.new_group([r for r in range(world) if int(coordinates[r]) == c])
        if c == int(coordinate):
            mine = group
    return mine


#: set while a PEFT model with sharded expert factors saves its adapter
_GATHERING = contextvars.ContextVar("accel_moe_gathering_lora", default=False)


def peft_order_of_b(weight: torch.Tensor, experts: int) -> torch.Tensor:
    """A gathered ``lora_B.weight`` of a sharded expert weight, columns expert-major
    (``e * r + i``), in PEFT's order (``i * E + e``)."""
    out = weight.shape[0]
    return weight.reshape(out, experts, -1).transpose(1, 2).reshape(out, -1)


def _expert_major_b(weight: torch.Tensor, experts: int) -> torch.Tensor:
    """The inverse of :func:`peft_order_of_b`: PEFT's ``lora_B.weight`` columns expert-major."""
    out = weight.shape[0]
    return weight.reshape(out, -1, experts).transpose(1, 2).reshape(out, -1)


def _full_state_dict_hook(
    module: Any, state_dict: dict, prefix: str, local_metadata: Any, *, b_experts: int = 0
) -> None:
    """While the adapter is saved (``save_pretrained``, which every process calls under
    load-time sharding): the sharded factors in ``state_dict()`` gathered into full tensors in
    PEFT's order, so PEFT writes its own format. Any other ``state_dict()`` (a sharded DCP
    checkpoint) keeps the DTensors."""
    from torch.distributed.tensor import DTensor

    if not _GATHERING.get():
        return
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, DTensor):
            full = value.full_tensor()
            state_dict[key] = peft_order_of_b(full, b_experts) if b_experts else full


def _local_delta_factors(wrapper: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lhs, rhs, scaling)`` of the local experts, with ``W + scaling * lhs @ rhs`` the adapted
    local weight: PEFT's ``get_delta_factors`` on the local slices of the factors."""
    shard = wrapper._accel_expert_shard
    weight_a = _ExpertFactorGrad.apply(
        wrapper.lora_A[adapter].weight.to_local(), shard["group"], shard["divide"]
    )
    weight_b = _ExpertFactorGrad.apply(
        wrapper.lora_B[adapter].weight.to_local(), shard["group"], shard["divide"]
    )
    experts = shard["local_experts"]
    weight_a = weight_a.reshape(experts, -1, weight_a.shape[-1])  # (experts, r, in)
    weight_b = weight_b.reshape(weight_b.shape[0], experts, -1).transpose(0, 1)  # (e, out, r)
    if wrapper._did_swap_in_out_features:  # stored as (experts, out, in)
        lhs, rhs = weight_b, weight_a
    else:  # stored as (experts, in, out)
        lhs, rhs = weight_a.transpose(-2, -1), weight_b.transpose(-2, -1)
    dtype = shard["dtype"]
    return lhs.to(dtype), rhs.to(dtype), wrapper.scaling[adapter]


@contextlib.contextmanager
def _activate_sharded_lora(self: Any, active_adapters: list[str]) -> Iterator[None]:
    """Replaces ``ParamWrapper._activate_lora`` on expert-parallel weights: instead of a
    parametrization of the sharded weight, the local factors go to the experts forward."""
    adapters = [a for a in active_adapters if a in self.lora_A]
    if not adapters:
        yield
        return
    if len(adapters) > 1:
        raise ValueError(
            "LoRA on expert-parallel experts runs one active adapter at a time "
            f"(active: {', '.join(adapters)})"
        )
    base = self.get_base_layer()
    factors = base.__dict__.setdefault(LORA_FACTORS, {})
    factors[self.parameter_name] = _local_delta_factors(self, adapters[0])
    try:
        yield
    finally:
        factors.pop(self.parameter_name, None)


def shard_expert_lora(model: Any) -> int:
    """Under expert parallelism: shard the LoRA factors of every expert weight like the experts
    (DTensors on the ep mesh, PEFT's layout as their global view), route them to the ScatterMoE
    forward, and gather them in ``state_dict()``. Returns the number of weights converted.

    The factors are first made equal on every process (PEFT initialised them from each
    process's RNG), as the Trainer does for the replicated parameters it syncs; the sharded
    ones it skips (DTensors), and their gradients are reduced by :class:`_ExpertFactorGrad`."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    wrappers = _expert_wrappers(model)
    if not wrappers:
        return 0
    first = getattr(wrappers[0][1], wrappers[0][0].parameter_name)
    mesh = first.device_mesh
    ep_mesh = mesh["ep"] if mesh.mesh_dim_names and "ep" in mesh.mesh_dim_names else mesh
    group = _replica_group(ep_mesh)
    dist_config = getattr(getattr(model, "config", None), "distributed_config", None)
    divide = float(getattr(dist_config, "dp_size", None) or dist.get_world_size())
    rank = ep_mesh.get_local_rank()
    for wrapper, experts in wrappers:
        param = getattr(experts, wrapper.parameter_name)
        local = experts.num_experts
        if wrapper.num_experts != local * ep_mesh.size():
            raise ValueError(
                f"{type(experts).__name__}.{wrapper.parameter_name}: PEFT made factors for "
                f"{wrapper.num_experts} experts, the process holds {local} of "
                f"{local * ep_mesh.size()}"
            )
        for adapter in list(wrapper.lora_A):
            a, b = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
            full_a, full_b = a.weight.detach().contiguous(), b.weight.detach().contiguous()
            dist.broadcast(full_a, src=0)
            dist.broadcast(full_b, src=0)
            r = full_a.shape[0] // wrapper.num_experts
            mine = slice(rank * local * r, (rank + 1) * local * r)
            rows = full_a[mine]
            full_b = _expert_major_b(full_b, wrapper.num_experts)
            cols = full_b[:, mine]
            a.weight = torch.nn.Parameter(
                DTensor.from_local(
                    rows.contiguous(), ep_mesh, [Shard(0)], run_check=False,
                    shape=full_a.shape, stride=full_a.stride(),
                ),
                requires_grad=a.weight.requires_grad,
            )  # fmt: skip
            b.weight = torch.nn.Parameter(
                DTensor.from_local(
                    cols.contiguous(), ep_mesh, [Shard(1)], run_check=False,
                    shape=full_b.shape, stride=full_b.stride(),
                ),
                requires_grad=b.weight.requires_grad,
            )  # fmt: skip
            for linear, b_experts in ((a, 0), (b, wrapper.num_experts)):
                if not getattr(linear, "_accel_full_state_dict", False):
                    hook = functools.partial(_full_state_dict_hook, b_experts=b_experts)
                    linear.register_state_dict_post_hook(hook)
                    linear._accel_full_state_dict = True
        wrapper._accel_expert_shard = {
            "local_experts": local,
            "group": group,
            "divide": divide,
            "dtype": param.dtype,
        }
        wrapper._activate_lora = types.MethodType(_activate_sharded_lora, wrapper)
    return len(wrappers)


def lora_folded(module: Any, name: str) -> torch.Tensor:
    """The expert weight ``name`` of ``module`` as the experts forward should use it: with the
    local LoRA factors folded in under expert parallelism (``W + scaling * lhs @ rhs``, PEFT's
    own fold), as it is otherwise (PEFT's parametrization already did it)."""
    weight = getattr(module, name)
    factors = module.__dict__.get(LORA_FACTORS)
    if factors and name in factors:
        lhs, rhs, scaling = factors[name]
        with torch.autocast(device_type=weight.device.type, enabled=False):
            weight = torch.baddbmm(weight, lhs, rhs, alpha=scaling)
    return weight


def peft_model_with_sharded_experts(model: Any, peft_config: Any) -> Any:
    """``get_peft_model`` with the expert factors sharded like the experts (expert parallelism)."""
    import peft

    peft_model = peft.get_peft_model(model, peft_config)
    if not shard_expert_lora(peft_model):
        raise ConfigError(
            "lora_experts under expert parallelism: PEFT wrapped no expert-parallel expert weight"
        )
    save_pretrained = peft_model.save_pretrained

    def save_gathered(*args: Any, **kwargs: Any) -> Any:
        """PEFT's ``save_pretrained`` with the sharded factors gathered (every process)."""
        token = _GATHERING.set(True)
        try:
            return save_pretrained(*args, **kwargs)
        finally:
            _GATHERING.reset(token)

    peft_model.save_pretrained = save_gathered
    return peft_model

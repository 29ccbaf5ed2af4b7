"""Which PEFT LoRA layers ``fused_lora`` patches, checked before anything is patched.

``base_layer`` names the kind of layer the adapters sit on: ``plain`` (``nn.Linear``),
``bitsandbytes`` (4-bit ``Linear4bit``) or ``auto_gptq`` (a gptqmodel quantised linear).
The model must have LoRA layers on that kind; layers on plain ``nn.Linear`` next to quantised
ones (an unquantised ``lm_head``, say) are fused too, since the fused op covers all three.
Any LoRA linear layer the op cannot reproduce (DoRA, several adapters, a base of another
kind, ...) is an error naming the layer and the reason: a layer is never left unfused silently.
LoRA layers that are not linear (``Embedding``, ``Conv*``) are outside this feature.

``can_fuse(module)`` says why a PEFT LoRA layer cannot be fused (or None) and
``fused_lora_forward(module, x)`` is the drop-in forward (``kernels.fused_lora`` has the op).
Instances are patched, not classes: when a module is in a state the fused op does not cover
(adapters disabled or merged at run time, ``adapter_names`` batches), ``fused_lora_forward``
calls the class's own forward.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from accel.api import PatchError, PatchRule, bind

from ..kernels.dequant import frozen_weight, unsupported_reason
from ..kernels.fused_lora import LoraProjection, fused_lora_multi
from ..support import supported_types

BASE_LAYERS = ("plain", "bitsandbytes", "auto_gptq")


def base_layer_kind(base: nn.Module) -> str:
    """``plain``, ``bitsandbytes``, ``auto_gptq`` or the class path of anything else."""
    cls = type(base)
    module = cls.__module__
    if module.startswith("bitsandbytes"):
        return "bitsandbytes"
    if module.startswith(("gptqmodel", "auto_gptq")):
        return "auto_gptq"
    if isinstance(base, nn.Linear):
        return "plain"
    return f"{module}.{cls.__name__}"


def lora_linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every PEFT LoRA layer whose base is a linear layer of any kind."""
    from peft.tuners.lora.layer import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if isinstance(base, (nn.Embedding, nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            continue
        found.append((name, module))
    return found


def check_fusable(model: nn.Module, base_layer: str) -> list[nn.Module]:
    """The LoRA layers to fuse; raises PatchError naming what is wrong otherwise."""
    model_name = type(model).__name__
    layers = lora_linear_layers(model)
    if not layers:
        raise PatchError(
            f"fused_lora: {model_name} has no PEFT LoRA linear layers to fuse; train with "
            "--peft_method lora (or switch fused_lora off)"
        )
    kinds = Counter(base_layer_kind(m.get_base_layer()) for _, m in layers)
    found = ", ".join(f"{count} on {kind}" for kind, count in kinds.most_common())
    if base_layer not in kinds:
        raise PatchError(
            f"fused_lora: base_layer is {base_layer!r} but no LoRA layer of {model_name} sits on "
            f"a {base_layer} layer; found {found}. Set base_layer to the kind the model has "
            f"(one of {', '.join(BASE_LAYERS)}), e.g. --fused_lora plain True"
        )
    allowed = {base_layer, "plain"}
    for name, module in layers:
        kind = base_layer_kind(module.get_base_layer())
        reason = (
            None
            if kind in allowed
            else f"its base layer is {kind}, not {base_layer} (LoRA layers found: {found})"
        )
        reason = reason or can_fuse(module)
        if reason is not None:
            raise PatchError(
                f"fused_lora cannot fuse LoRA layer '{name}' ({type(module).__name__}) of "
                f"{model_name}: {reason}. Switch fused_lora off or change the adapter config."
            )
    return [m for _, m in layers]


def _lora_layer_types() -> tuple[type, ...]:
    """PEFT LoRA layer classes whose forward the fused op reproduces."""
    from peft.tuners.lora.gptq import GPTQLoraLinear
    from peft.tuners.lora.layer import Linear

    types: list[type] = [Linear, GPTQLoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed: peft does not define the class
        pass
    else:
        types.append(Linear4bit)
    return tuple(types)


def _active_adapter(lora_module: nn.Module) -> tuple[str | None, str | None]:
    """(adapter name, None) for a single active LoRA adapter, else (None, reason)."""
    active = [a for a in lora_module.active_adapters if a in lora_module.lora_A]
    if len(active) != 1:
        return None, (
            f"{len(active)} active LoRA adapters on this layer ({active}); the fused op "
            "handles exactly one"
        )
    return active[0], None


def can_fuse(lora_module: nn.Module) -> str | None:
    """None when ``fused_lora_forward`` reproduces ``lora_module``'s forward, else the reason.

    ``lora_module`` is a PEFT LoRA layer: ``peft.tuners.lora.layer.Linear``, the bitsandbytes
    ``Linear4bit`` LoRA layer or ``GPTQLoraLinear``. Checked: layer type, disabled or merged
    adapters, exactly one active adapter, DoRA and other LoRA variants, ``lora_bias``,
    dropout module type, ``fan_in_fan_out`` and the base layer type (``dequant``).
    """
    from peft.tuners.lora.layer import LoraLayer

    kind = type(lora_module).__name__
    if not isinstance(lora_module, LoraLayer):
        return f"{type(lora_module).__module__}.{kind} is not a PEFT LoraLayer"
    if not isinstance(lora_module, _lora_layer_types()):
        return f"LoRA layer type {kind} is not supported (only Linear, Linear4bit, GPTQLoraLinear)"
    if lora_module.disable_adapters:
        return "the adapters of this layer are disabled"
    if lora_module.merged_adapters:
        return f"adapters {lora_module.merged_adapters} are merged into the base weight"
    name, reason = _active_adapter(lora_module)
    if reason is not None:
        return reason
    if lora_module.use_dora.get(name, False):
        return f"adapter {name!r} uses DoRA (use_dora=True), which the fused op does not implement"
    if name in lora_module.lora_variant:
        variant = type(lora_module.lora_variant[name]).__name__
        return f"adapter {name!r} is a LoRA variant ({variant}), not plain LoRA"
    if lora_module.lora_bias.get(name, False):
        return f"adapter {name!r} has lora_bias=True (a bias on lora_B)"
    dropout = lora_module.lora_dropout[name]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return (
            f"adapter {name!r} uses dropout module {type(dropout).__name__}; only nn.Dropout "
            "and nn.Identity are supported"
        )
    if getattr(lora_module, "fan_in_fan_out", False):
        return "the base layer stores its weight transposed (fan_in_fan_out=True)"
    lora_a, lora_b = lora_module.lora_A[name], lora_module.lora_B[name]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None:
        return f"adapter {name!r} has lora_A/lora_B modules other than bias-free nn.Linear"
    return unsupported_reason(lora_module.get_base_layer())


def _projection(lora_module: nn.Module) -> LoraProjection:
    """The active adapter of a layer ``can_fuse`` has just accepted, as a ``LoraProjection``
    (dropout counts only while the dropout module is in training mode)."""
    name, _ = _active_adapter(lora_module)
    dropout = lora_module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    return LoraProjection(
        base=frozen_weight(lora_module.get_base_layer(), checked=True),
        lora_A=lora_module.lora_A[name].weight,
        lora_B=lora_module.lora_B[name].weight,
        scaling=lora_module.scaling[name],
        dropout_p=p,
    )


def fused_lora_forward(lora_module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Drop-in replacement for a PEFT LoRA layer's ``forward``.

    Falls back to the layer class's own forward when extra arguments are passed (e.g.
    ``adapter_names``) or ``can_fuse`` refuses the layer in its current state (adapters
    disabled or merged at run time), so it is safe to install once and leave in place.
    """
    if args or kwargs or can_fuse(lora_module) is not None:
        return type(lora_module).forward(lora_module, x, *args, **kwargs)
    (y,) = fused_lora_multi(x, [_projection(lora_module)])
    return y


def rules(settings: Any, model: nn.Module) -> list[PatchRule]:
    """The ``lora_linear`` rule for every LoRA layer ``check_fusable`` accepts."""
    targets = {id(m) for m in check_fusable(model, str(settings.base_layer))}
    return [
        PatchRule(
            name="lora_linear",
            feature="fused_lora",
            model_types=supported_types("fused_lora"),
            match=lambda m: id(m) in targets,
            forward=lambda m: bind(fused_lora_forward, m),
        )
    ]

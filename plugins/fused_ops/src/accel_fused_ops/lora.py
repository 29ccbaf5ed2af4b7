"""Which PEFT LoRA layers ``fused_lora`` patches, checked before anything is patched.

``base_layer`` names the kind of layer the adapters sit on: ``plain`` (``nn.Linear``),
``bitsandbytes`` (4-bit ``Linear4bit``) or ``auto_gptq`` (a gptqmodel quantised linear).
The model must have LoRA layers on that kind; layers on plain ``nn.Linear`` next to quantised
ones (an unquantised ``lm_head``, say) are fused too, since the fused op covers all three.
Any LoRA linear layer the op cannot reproduce (DoRA, several adapters, a base of another
kind, ...) is an error naming the layer and the reason: a layer is never left unfused silently.
LoRA layers that are not linear (``Embedding``, ``Conv*``) are outside this feature.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from accel import PatchError

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
    from .kernels.fused_lora import can_fuse

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

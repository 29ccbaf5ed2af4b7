"""Checks of a quantized base before it loads: which plugin a quantized checkpoint needs, that
the quantization plugins (package ``accel-peft``) train LoRA adapters only, and that
fused_ops' ``fused_lora`` names the base those plugins load (the fused_ops check of the layers
themselves runs only once the adapters are in place, after the model has loaded)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import catalog_for_name

#: quant_method of a checkpoint -> the plugin and flag that train on it
_CHECKPOINT_PLUGINS = {"gptq": ("auto_gptq", "--auto_gptq triton_v2")}
#: quantization plugin (also the fused_lora base_layer naming its layers) -> its flag
_BASE_FLAGS = {"bitsandbytes": "--bnb_qlora nf4", "auto_gptq": "--auto_gptq triton_v2"}


def check_quantized_base(config: Any, framework: Any, model_config: Any) -> None:
    """``framework``: the run's :class:`accel.AccelerationFramework` (its active plugins)."""
    active = framework.names
    qconfig = getattr(model_config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    method = (qconfig or {}).get("quant_method")
    name = config.model.model_name_or_path
    if method in _CHECKPOINT_PLUGINS:
        plugin, flag = _CHECKPOINT_PLUGINS[method]
        if plugin not in active:
            raise ConfigError(
                f"model '{name}' is a {method.upper()} checkpoint (quant_method '{method}' in "
                f"its config.json); train LoRA adapters on it with {flag} --peft_method lora"
            )
    entry = catalog_for_name("peft")
    quantizing = [p for p in active if entry is not None and p in entry.plugins]
    method_name = config.tuning.peft_method
    if quantizing and method_name != "lora":
        what = "full fine-tuning" if method_name == "none" else f"peft_method '{method_name}'"
        raise ConfigError(
            f"plugin '{quantizing[0]}' trains LoRA adapters on a frozen 4-bit base, not "
            f"{what}; pass --peft_method lora"
        )
    check_fused_lora_base(_fused_lora_base(framework), quantizing)


def _fused_lora_base(framework: Any) -> str | None:
    """fused_ops' ``base_layer`` when its ``fused_lora`` is on (``settings`` merges the
    plugin's two config paths), else None."""
    plugin = framework.get("fused_ops")
    settings = getattr(plugin, "settings", None)
    if settings is None or not getattr(settings, "fused_lora", False):
        return None
    return getattr(settings, "base_layer", None)


def check_fused_lora_base(base_layer: str | None, quantizing: list[str]) -> None:
    """A quantized ``base_layer`` must be the base the quantization plugin loads: the other
    plugin's base leaves no LoRA layer of that kind to fuse. (Without a quantization plugin,
    fused_ops' own check names the layers it found once the adapters are in place.)"""
    if base_layer not in _BASE_FLAGS or not quantizing or quantizing[0] == base_layer:
        return
    loaded = quantizing[0]
    raise ConfigError(
        f"--fused_lora {base_layer} True: fused_lora's base_layer is '{base_layer}', but the "
        f"base is loaded by plugin '{loaded}' ({_BASE_FLAGS[loaded]}), so the LoRA layers sit "
        f"on {loaded} layers; pass --fused_lora {loaded} True"
    )

"""Checks of a quantized base before it loads: which plugin a quantized checkpoint needs, and
that the quantization plugins (package ``accel-peft``) train LoRA adapters only."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import catalog_for_name

#: quant_method of a checkpoint -> the plugin and flag that train on it
_CHECKPOINT_PLUGINS = {"gptq": ("auto_gptq", "--auto_gptq triton_v2")}


def check_quantized_base(config: Any, active: list[str], model_config: Any) -> None:
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

"""Small plugins used by the core tests, passed to the framework without installing them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from accel import AccelerationPlugin, Flag, hook
from accel.registry import PluginInfo


@dataclass
class KernelsConfig:
    fast_loss: bool = False
    fast_rms_layernorm: bool = False
    mode: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class LoraKernelConfig:
    base_layer: Literal["auto_gptq", "bitsandbytes"] | None = None
    fused_lora: bool = False


class KernelsPlugin(AccelerationPlugin):
    name = "kernels"
    config_paths = ("training.kernels", "peft.quantization.kernels")
    config_schema = {
        "training.kernels": KernelsConfig,
        "peft.quantization.kernels": LoraKernelConfig,
    }
    flags = (
        Flag("kernels", "training.kernels", "loss rms", fields=("fast_loss", "fast_rms_layernorm")),
        Flag(
            "lora_kernels",
            "peft.quantization.kernels",
            "base fused",
            fields=("base_layer", "fused_lora"),
        ),
    )
    model_types = ("llama", "mistral")
    unsupported_reasons = {"gpt_bigcode": "its fused qkv projection is not handled"}


class LoaderPlugin(AccelerationPlugin):
    name = "loader"
    config_paths = ("peft.quantization.loader",)

    @hook
    def load_model(self, model_name_or_path, model_kwargs):
        return ("loaded-by-plugin", model_name_or_path, model_kwargs)


class OtherLoaderPlugin(AccelerationPlugin):
    name = "other_loader"
    config_paths = ("peft.quantization.other_loader",)

    @hook
    def load_model(self, model_name_or_path):
        return "other"


class NeedsKernels(AccelerationPlugin):
    name = "needs_kernels"
    config_paths = ("training.needs_kernels",)
    requires = ("kernels",)


class NeedsGhost(AccelerationPlugin):
    name = "needs_ghost"
    config_paths = ("training.needs_ghost",)
    requires = ("ghost",)


class Conflicting(AccelerationPlugin):
    name = "conflicting"
    config_paths = ("training.conflicting",)
    conflicts = ("kernels",)


class FutureCore(AccelerationPlugin):
    name = "future_core"
    config_paths = ("training.future_core",)
    core_versions = ">=9.0"


class NeedsPackage(AccelerationPlugin):
    name = "needs_package"
    config_paths = ("training.needs_package",)
    required_packages = ("surely-not-an-installed-package>=1.0",)


def infos(*classes: type[AccelerationPlugin]) -> dict[str, PluginInfo]:
    return {c.name: PluginInfo(c.name, c, "test-plugins", "0.0", "") for c in classes}

"""The two plugin classes: config, flags, and the hooks that load the 4-bit base and put the
LoRA adapters on it. The work is in :mod:`.loading` and :mod:`.adapters` (imported lazily, so
``accel plugins`` does not import torch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from accel.api import AccelerationPlugin, ConfigError, Flag, hook

from .config import AutoGPTQConfig, BitsAndBytesConfig
from .packages import PACKAGES

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel, TrainingArguments

GPTQ_PATH = "peft.quantization.auto_gptq"
BNB_PATH = "peft.quantization.bitsandbytes"


class _QuantizedLoRAPlugin(AccelerationPlugin):
    """What both bases share: LoRA only, adapters in the training dtype, no fp32 upcast.

    ``base_layer`` (the kind fused_ops' ``--fused_lora`` calls this base) and ``usage`` are
    the capabilities other plugins and the core read.
    """

    @hook
    def check_run(self, run_config: Any) -> None:
        """The frozen 4-bit base takes no gradients: only LoRA adapters train on it."""
        method = run_config.tuning.peft_method
        if method != "lora":
            what = "full fine-tuning" if method == "none" else f"peft_method '{method}'"
            raise ConfigError(
                f"{self.usage} trains LoRA adapters on a frozen 4-bit base, not {what}; "
                "pass --peft_method lora"
            )

    @hook
    def augment_model(
        self,
        model: PreTrainedModel,
        train_args: TrainingArguments,
        peft_config: PeftConfig | None,
    ) -> tuple[Any, PeftConfig | None]:
        from .adapters import add_adapters

        if self.leaves_adapters_to_trainer():
            from .adapters import common_recipe

            return common_recipe(model, train_args), peft_config
        return add_adapters(model, train_args, peft_config), None

    def leaves_adapters_to_trainer(self) -> bool:
        return False

    def base_info(self) -> dict[str, Any]:
        return {"method": self.base_layer}

    @hook
    def export(self, model: Any, output_dir: str) -> None:
        """Record the base's quantization and the training dtype next to the adapters, for
        ``accel export merged``."""
        from .export import write_base_info

        dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
        write_base_info(output_dir, {**self.base_info(), "torch_dtype": dtype})


class BitsAndBytesPlugin(_QuantizedLoRAPlugin):
    name = "bitsandbytes"
    config_paths = (BNB_PATH,)
    config_schema = BitsAndBytesConfig
    flags = (
        Flag(
            "bnb_qlora",
            BNB_PATH,
            "QLoRA: 4-bit bitsandbytes base (nf4 or fp4), e.g. nf4; 2nd value: no_peft_model",
            fields=("quant_type", "no_peft_model"),
            nargs=(1, 2),
        ),
    )
    conflicts = ("auto_gptq",)
    required_packages = PACKAGES["bitsandbytes"]
    usage = "--bnb_qlora nf4"
    base_layer = "bitsandbytes"

    @hook
    def load_model(self, model_name_or_path: str, model_kwargs: dict[str, Any]) -> Any:
        from .loading import load_bnb_4bit

        return load_bnb_4bit(model_name_or_path, model_kwargs, self.config().quant_type)

    def leaves_adapters_to_trainer(self) -> bool:
        return self.config().no_peft_model

    def base_info(self) -> dict[str, Any]:
        return {"method": "bitsandbytes", "quant_type": self.config().quant_type}

    @hook
    def report_lines(self) -> Sequence[str]:
        cfg = self.config()
        adapters = (
            "the trainer (no_peft_model: prepare_model_for_kbit_training, fp32 upcast)"
            if cfg.no_peft_model
            else "this plugin, in the training dtype (frozen weights not upcast)"
        )
        return [
            f"base: bitsandbytes 4-bit {cfg.quant_type}, double quantization, "
            "compute dtype = torch_dtype",
            f"adapters: {adapters}",
        ]


class AutoGPTQPlugin(_QuantizedLoRAPlugin):
    name = "auto_gptq"
    config_paths = (GPTQ_PATH,)
    config_schema = AutoGPTQConfig
    flags = (
        Flag(
            "auto_gptq",
            GPTQ_PATH,
            "GPTQ-LoRA on a GPTQ checkpoint (gptqmodel), e.g. triton_v2; 2nd value: from_quantized",
            fields=("kernel", "from_quantized"),
            nargs=(1, 2),
        ),
    )
    conflicts = ("bitsandbytes",)
    required_packages = PACKAGES["gptq"]
    usage = "--auto_gptq triton_v2"
    base_layer = "auto_gptq"
    quant_methods = ("gptq",)

    @hook
    def load_model(self, model_name_or_path: str, model_kwargs: dict[str, Any]) -> Any:
        from .loading import load_gptq

        return load_gptq(model_name_or_path, model_kwargs)

    @hook
    def report_lines(self) -> Sequence[str]:
        from .loading import gptq_backend

        return [
            f"base: GPTQ checkpoint, gptqmodel backend {gptq_backend()} (kernel "
            f"{self.config().kernel})",
            "adapters: this plugin, on every quantized linear for all-linear",
        ]

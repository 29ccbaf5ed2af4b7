"""The config schemas, with fms-acceleration's keys and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AutoGPTQConfig:
    """``plugins.peft.quantization.auto_gptq``."""

    kernel: Literal["triton_v2"] = field(
        default="triton_v2",
        metadata={
            "help": "GPTQ kernel family: gptqmodel's Triton kernel on CUDA, its torch kernel on CPU"
        },
    )
    from_quantized: bool = field(
        default=True,
        metadata={
            "help": "the model is a GPTQ checkpoint (must be true; write one with `accel quantize`)"
        },
    )
    use_external_lib: bool = field(
        default=False,
        metadata={
            "help": "accepted for compatibility: the kernels always come from gptqmodel, the "
            "maintained successor of auto-gptq"
        },
    )

    def __post_init__(self) -> None:
        if not self.from_quantized:
            raise ValueError(
                "from_quantized false (quantize while loading) is not supported; quantize the "
                "model once with `accel quantize <model_dir> <output_dir> --calibration <file>` "
                "and train on the output (from_quantized: true)"
            )


@dataclass
class BitsAndBytesConfig:
    """``plugins.peft.quantization.bitsandbytes``."""

    quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type of the frozen base weights"}
    )
    no_peft_model: bool = field(
        default=False,
        metadata={
            "help": "true: only load the 4-bit model and leave the adapters to the trainer, with "
            "PEFT's prepare_model_for_kbit_training (the common recipe: frozen weights upcast "
            "to fp32); false: the plugin applies the adapters in the training dtype without "
            "the upcast"
        },
    )

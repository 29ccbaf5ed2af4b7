"""The fused_ops config: one schema for both activation paths (fms-acceleration layout).

``training.fused_ops_and_kernels`` usually carries the kernel switches and
``peft.quantization.fused_ops_and_kernels`` the fused-LoRA ones, but either path accepts
every key, as fms-acceleration's did; the plugin merges the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

FastLoss = Literal["cross_entropy", "fused_linear", "fused_ce_liger"]
BaseLayer = Literal["auto_gptq", "bitsandbytes", "plain"]


@dataclass
class FusedOpsConfig:
    fast_loss: bool | FastLoss = field(
        default=False,
        metadata={
            "help": "true = fused linear cross-entropy (training never builds the logits); "
            "'cross_entropy' keeps the logits and uses the cross-entropy kernel; "
            "'fused_ce_liger' = 'fused_linear'"
        },
    )
    fast_rms_layernorm: bool = field(default=False, metadata={"help": "RMSNorm kernel"})
    fast_rope_embeddings: bool = field(default=False, metadata={"help": "RoPE kernel"})
    fast_swiglu: bool = field(
        default=False,
        metadata={"help": "SwiGLU/GeGLU kernel in gated MLPs (4th --fast_kernels value)"},
    )
    base_layer: BaseLayer | None = field(
        default=None,
        metadata={
            "help": "what LoRA adapters sit on: auto_gptq (gptqmodel), bitsandbytes (4-bit) "
            "or plain; must match the model"
        },
    )
    fused_lora: bool = field(
        default=False, metadata={"help": "base matmul + LoRA update in one autograd function"}
    )

    def __post_init__(self) -> None:
        if self.fused_lora and self.base_layer is None:
            raise ValueError(
                "fused_lora is true but base_layer is not set; set base_layer to auto_gptq, "
                "bitsandbytes or plain (flag: --fused_lora <base_layer> True)"
            )

    def enables_nothing(self) -> bool:
        """True when no kernel is switched on (``--fast_kernels False False False``): the core
        then refuses the section instead of listing an active plugin that changes nothing."""
        switches = (self.fast_rms_layernorm, self.fast_rope_embeddings, self.fast_swiglu)
        return self.fast_loss is False and not any(switches) and not self.fused_lora

    def merged(self, other: FusedOpsConfig) -> FusedOpsConfig:
        """Combine the configs of both paths: a switch is on if either path turns it on."""
        default = FusedOpsConfig()
        values = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            values[f.name] = theirs if mine == getattr(default, f.name) else mine
            if mine != getattr(default, f.name) and theirs not in (getattr(default, f.name), mine):
                raise ValueError(
                    f"fused_ops_and_kernels.{f.name} is {mine!r} under one path and {theirs!r} "
                    "under the other; give one value"
                )
        return FusedOpsConfig(**values)

    @property
    def loss_mode(self) -> str | None:
        if self.fast_loss is False:
            return None
        if self.fast_loss is True or self.fast_loss == "fused_ce_liger":
            return "fused_linear"
        return self.fast_loss

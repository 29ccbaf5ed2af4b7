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
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "label smoothing computed inside the fused loss (as torch's); "
            "--label_smoothing_factor sets it when the fused loss is on"
        },
    )
    z_loss: float = field(
        default=0.0,
        metadata={
            "help": "z-loss scale: adds z_loss * logsumexp(logits)^2 per token to the fused loss "
            "and logs the term as z_loss"
        },
    )
    token_accuracy: bool = field(
        default=False,
        metadata={
            "help": "log token_accuracy (share of label tokens that are the argmax), computed "
            "in the fused loss pass without the logits"
        },
    )
    loss_memory_budget_mib: int | None = field(
        default=None,
        metadata={
            "help": "MiB one chunk of the fused linear loss's logits may take; default: the "
            "rows the matmuls need for full speed, at most 256 MiB (CPU) / 64 MiB (CUDA); "
            "a frozen lm_head on CPU streams 32 MiB vocabulary blocks instead"
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
        self._check_options_need_their_feature()
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if not self.z_loss >= 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.loss_memory_budget_mib is not None and self.loss_memory_budget_mib < 1:
            raise ValueError(
                f"loss_memory_budget_mib must be a positive number of MiB, got "
                f"{self.loss_memory_budget_mib}"
            )
        if self.fused_lora and self.base_layer is None:
            raise ValueError(
                "fused_lora is true but base_layer is not set; set base_layer to auto_gptq, "
                "bitsandbytes or plain (flag: --fused_lora <base_layer> True)"
            )

    def _check_options_need_their_feature(self) -> None:
        from .features import FEATURES

        defaults = FusedOpsConfig.__dataclass_fields__
        for feature in FEATURES:
            if not feature.options_need_it or feature.enabled(self):
                continue
            given = [o for o in feature.options if getattr(self, o) != defaults[o].default]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but {feature.name} is off; these options belong "
                    f"to {feature.name}: turn it on ({feature.name}: true) or remove them"
                )

    def enables_nothing(self) -> bool:
        """True when no feature is switched on (``--fast_kernels False False False``): the
        core then refuses the section instead of listing an active plugin that changes
        nothing."""
        from .features import requested

        return not requested(self)

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

"""The fused_ops plugin class: config, flags, and the patch rules it hands to the core."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING

from accel import AccelerationPlugin, Flag, PatchRule, hook

from .config import FusedOpsConfig
from .support import ALL_MODEL_TYPES

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel, TrainingArguments

TRAINING_PATH = "training.fused_ops_and_kernels"
PEFT_PATH = "peft.quantization.fused_ops_and_kernels"


class FusedOpsPlugin(AccelerationPlugin):
    name = "fused_ops"
    config_paths = (TRAINING_PATH, PEFT_PATH)
    config_schema = FusedOpsConfig
    flags = (
        Flag(
            name="fast_kernels",
            path=TRAINING_PATH,
            fields=("fast_loss", "fast_rms_layernorm", "fast_rope_embeddings", "fast_swiglu"),
            nargs=(3, 4),
            help="fused loss, RMSNorm and RoPE kernels on/off (4th value: SwiGLU), e.g. True True True",
        ),
        Flag(
            name="fused_lora",
            path=PEFT_PATH,
            fields=("base_layer", "fused_lora"),
            help="base_layer (auto_gptq|bitsandbytes|plain) and True, e.g. auto_gptq True",
        ),
    )
    # peft's quantization plugins (when installed) must put the adapters in place first
    after = ("auto_gptq", "bitsandbytes")
    #: the union over features; each feature checks its own list (``support.FEATURES``)
    model_types = ALL_MODEL_TYPES

    def __init__(self, configs: dict[str, FusedOpsConfig]) -> None:
        super().__init__(configs)
        #: both paths' configs merged into one (raises ValueError on contradicting values)
        self.settings = reduce(FusedOpsConfig.merged, self.configs.values(), FusedOpsConfig())

    @hook
    def augment_model(
        self, model: PreTrainedModel, train_args: TrainingArguments, peft_config: PeftConfig | None
    ) -> tuple[PreTrainedModel, PeftConfig | None]:
        """Refuse settings the fused loss would silently bypass, before training starts."""
        smoothing = getattr(train_args, "label_smoothing_factor", 0.0)
        if self.settings.loss_mode is not None and smoothing:
            from accel.errors import ConfigError

            # transformers' Trainer then pops the labels and smooths the model's logits
            # itself: the fused loss never runs (and fused-linear mode returns no logits).
            raise ConfigError(
                f"--label_smoothing_factor {smoothing} cannot be combined with the fused loss "
                f"(fast_loss={self.settings.fast_loss!r}): set --label_smoothing_factor 0 or "
                "turn the fused loss off (--fast_kernels False ...)"
            )
        return model, peft_config

    @hook
    def patch_rules(self, model: PreTrainedModel | PeftModel) -> Sequence[PatchRule]:
        from .rules import build_rules

        return build_rules(self.settings, model)

    @hook
    def report_lines(self) -> Sequence[str]:
        from .rules import requested_features

        features = requested_features(self.settings)
        lines = [f"features: {', '.join(features) if features else '(none)'}"]
        if "fast_loss" in features:
            lines.append(f"loss: {self.settings.loss_mode}")
        if "fast_rope_embeddings" in features:
            lines.append(
                "rope: apply_rotary_pos_emb is replaced in the modeling file, so every model of "
                "that architecture in this process uses it until the patch is reverted"
            )
        return lines

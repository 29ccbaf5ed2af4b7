"""The fused_ops plugin class: config, flags, and the patch rules it hands to the core."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

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
    #: every architecture of the support table; each feature checks its own entry there
    model_types = ALL_MODEL_TYPES

    def __init__(self, configs: dict[str, FusedOpsConfig]) -> None:
        super().__init__(configs)
        #: both paths' configs merged into one (raises ValueError on contradicting values)
        self.settings = reduce(FusedOpsConfig.merged, self.configs.values(), FusedOpsConfig())

    @hook
    def augment_model(
        self, model: PreTrainedModel, train_args: TrainingArguments, peft_config: PeftConfig | None
    ) -> tuple[PreTrainedModel, PeftConfig | None]:
        """Move ``--label_smoothing_factor`` into the fused loss.

        transformers' Trainer would pop the labels and smooth the model's logits itself, so
        the fused loss would never run (and fused-linear mode returns no logits). Instead the
        factor becomes the fused loss's ``label_smoothing`` (the same loss: torch's smoothing,
        normalised by ``num_items_in_batch`` as the Trainer's smoother is), the argument is 0
        while the Trainer is built (no label smoother) and restored in :meth:`callbacks`.
        """
        smoothing = float(getattr(train_args, "label_smoothing_factor", 0.0) or 0.0)
        if self.settings.loss_mode is not None and smoothing:
            import dataclasses

            configured = self.settings.label_smoothing
            if configured not in (0.0, smoothing):
                from accel.errors import ConfigError

                raise ConfigError(
                    f"--label_smoothing_factor {smoothing} and fused_ops_and_kernels."
                    f"label_smoothing {configured} disagree; give one of them"
                )
            self.settings = dataclasses.replace(self.settings, label_smoothing=smoothing)
            self._restore_smoothing = (train_args, smoothing)
            train_args.label_smoothing_factor = 0.0
        return model, peft_config

    @hook
    def callbacks(self, model: PreTrainedModel | PeftModel, accelerator: Any) -> Sequence[Any]:
        """Log token_accuracy / z_loss when asked for; the Trainer now exists, so the
        label-smoothing argument taken over in :meth:`augment_model` is put back."""
        restore = getattr(self, "_restore_smoothing", None)
        if restore is not None:
            train_args, smoothing = restore
            train_args.label_smoothing_factor = smoothing
            self._restore_smoothing = None
        if not (self.settings.token_accuracy or self.settings.z_loss):
            return []
        from .integration.loss import metrics_callback

        return [metrics_callback(model, accelerator)]

    @hook
    def patch_rules(self, model: PreTrainedModel | PeftModel) -> Sequence[PatchRule]:
        from .rules import build_rules

        return build_rules(self.settings, model)

    @hook
    def report_lines(self) -> Sequence[str]:
        from .features import requested

        features = requested(self.settings)
        names = ", ".join(f.name for f in features)
        lines = [f"features: {names or '(none)'}"]
        for feature in sorted(features, key=lambda f: f.name != "fast_loss"):  # loss line first
            lines += feature.report(self.settings)
        return lines

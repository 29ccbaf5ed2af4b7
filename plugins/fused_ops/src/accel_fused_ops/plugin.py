"""The fused_ops plugin class: config, flags, and the patch rules it hands to the core."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

from accel.api import AccelerationPlugin, BaseLayer, ConfigError, Flag, PatchRule, hook

from .config import FusedOpsConfig
from .features import FLAGS, PEFT_PATH, TRAINING_PATH, flag_fields
from .support import ALL_MODEL_TYPES

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

#: the fused_lora base layers that a quantization plugin loads (its ``base_layer``)
QUANTIZED_BASES = ("auto_gptq", "bitsandbytes")


class FusedOpsPlugin(AccelerationPlugin):
    name = "fused_ops"
    config_paths = (TRAINING_PATH, PEFT_PATH)
    config_schema = FusedOpsConfig
    #: fms-hf-tuning's flags; which field each value sets comes from the feature records
    flags = tuple(
        Flag(name=name, path=spec.path, fields=flag_fields(name), nargs=spec.nargs, help=spec.help)
        for name, spec in FLAGS.items()
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
    def check_run(self, run_config: Any, base_layer: BaseLayer | None) -> None:
        """Take ``--label_smoothing_factor`` into the fused loss, and check that a quantized
        ``--fused_lora`` base_layer is the base that is loaded, before the model loads.

        transformers' Trainer would pop the labels and smooth the model's logits itself, so
        the fused loss would never run (and fused-linear mode returns no logits). Instead the
        factor becomes the fused loss's ``label_smoothing`` (the same loss: torch's smoothing,
        normalised by ``num_items_in_batch`` as the Trainer's smoother is), and
        ``applies_label_smoothing`` tells the trainer to build no smoother of its own.
        """
        train_args = run_config.training
        smoothing = float(getattr(train_args, "label_smoothing_factor", 0.0) or 0.0)
        if self.settings.loss_mode is not None and smoothing:
            import dataclasses

            configured = self.settings.label_smoothing
            if configured not in (0.0, smoothing):
                raise ConfigError(
                    f"--label_smoothing_factor {smoothing} and fused_ops_and_kernels."
                    f"label_smoothing {configured} disagree; give one of them"
                )
            self.settings = dataclasses.replace(self.settings, label_smoothing=smoothing)
            self.applies_label_smoothing = True
        self._check_fused_lora_base(base_layer)

    def _check_fused_lora_base(self, loaded: BaseLayer | None) -> None:
        """A quantized ``base_layer`` must be the base the quantization plugin loads: another
        base leaves no LoRA layer of that kind to fuse. (Without a quantized base, the check
        of the layers found runs once the adapters are in place.)"""
        wanted = self.settings.base_layer if self.settings.fused_lora else None
        if wanted not in QUANTIZED_BASES or loaded is None or loaded.kind == wanted:
            return
        raise ConfigError(
            f"--fused_lora {wanted} True: fused_lora's base_layer is '{wanted}', but the base "
            f"is loaded by plugin '{loaded.plugin}' ({loaded.usage}), so the LoRA layers sit "
            f"on {loaded.kind} layers; pass --fused_lora {loaded.kind} True"
        )

    @hook
    def callbacks(self, model: PreTrainedModel | PeftModel, accelerator: Any) -> Sequence[Any]:
        """Log token_accuracy / z_loss when asked for."""
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

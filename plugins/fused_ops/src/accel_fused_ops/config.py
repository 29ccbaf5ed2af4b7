"""The fused_ops config: one schema for both activation paths (fms-acceleration layout).

``training.fused_ops_and_kernels`` usually carries the kernel switches and
``peft.quantization.fused_ops_and_kernels`` the fused-LoRA ones, but either path accepts
every key, as fms-acceleration's did; the plugin merges the two.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from typing import Any

from .features import FEATURES, SCHEMA, BaseLayer, FastLoss, requested

__all__ = ["BaseLayer", "FastLoss", "FusedOpsConfig"]


class _FusedOpsChecks:
    """The checks and helpers of :class:`FusedOpsConfig`, whose fields come from the feature
    records (:data:`accel_fused_ops.features.SCHEMA`)."""

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
        for feature in FEATURES:
            if not feature.options_need_it or feature.enabled(self):
                continue
            given = [o.name for o in feature.options if getattr(self, o.name) != o.default]
            if given:
                raise ValueError(
                    f"{', '.join(given)} set but {feature.name} is off; these options belong "
                    f"to {feature.name}: turn it on ({feature.name}: true) or remove them"
                )

    def enables_nothing(self) -> bool:
        """True when no feature is switched on (``--fast_kernels False False False``): the
        core then refuses the section instead of listing an active plugin that changes
        nothing."""
        return not requested(self)

    def merged(self, other: Any) -> Any:
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


#: the schema of both paths: one field per :class:`~accel_fused_ops.features.Option` of the
#: feature records, with its type, default and help
FusedOpsConfig = make_dataclass(
    "FusedOpsConfig",
    [(o.name, o.type, field(default=o.default, metadata={"help": o.help})) for o in SCHEMA],
    bases=(_FusedOpsChecks,),
    namespace={"__module__": __name__, "__doc__": __doc__.split("\n\n")[0]},
)

"""The scattermoe plugin: experts implementation, expert parallelism, LoRA on experts/router."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from accel.api import AccelerationPlugin, ConfigError, Flag, hook

from . import IMPLEMENTATION
from .config import ScatterMoEConfig

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel, TrainingArguments

PATH = "training.moe.scattermoe"

#: architectures whose experts class uses transformers' ``@use_experts_implementation``
#: (transformers 5.23, models/*/modeling_*.py), so an experts implementation replaces theirs
EXPERTS_INTERFACE_MODEL_TYPES = (
    "afmoe", "aria", "bailing_hybrid", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
    "glm4_moe_lite", "gpt_oss", "granitemoe", "granitemoehybrid", "granitemoeshared",
    "hunyuan_v1_moe", "jamba", "kimi_linear", "lfm2_moe", "minimax", "minimax_m2",
    "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_moe",
    "qwen3_next", "solar_open",
)  # fmt: skip


class ScatterMoEPlugin(AccelerationPlugin):
    name = "scattermoe"
    config_paths = (PATH,)
    config_schema = ScatterMoEConfig
    flags = (
        Flag(
            name="fast_moe",
            path=PATH,
            fields=("ep_degree",),
            help="ScatterMoE experts; N = expert-parallel degree, True = experts sharded by "
            "fsdp_size, False = experts replicated",
        ),
    )
    model_types = EXPERTS_INTERFACE_MODEL_TYPES

    def __init__(self, configs: dict[str, ScatterMoEConfig]) -> None:
        super().__init__(configs)
        self.settings: ScatterMoEConfig = self.config()

    @hook
    def check_run(self) -> None:
        """Before anything loads, at training time only: the launch can hold ``ep_size``
        expert shards (reading or translating a config, e.g. ``accel arguments``, needs no
        launch)."""
        from .parallel import check_launch

        try:
            check_launch(self.settings.ep_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @hook
    def load_model(self, model_name_or_path: str, model_kwargs: dict[str, Any]) -> PreTrainedModel:
        from accel.api import default_loader, load_model_config

        from .experts import register
        from .parallel import check_model, distributed_config

        settings = self.settings
        check_model(load_model_config(model_name_or_path), settings.ep_size)
        register()
        kwargs = dict(model_kwargs)
        kwargs["experts_implementation"] = IMPLEMENTATION
        dist = distributed_config(
            settings.ep_size, settings.replicate_experts, kwargs.pop("distributed_config", None)
        )
        if dist is not None:
            kwargs["distributed_config"] = dist
        return default_loader(model_name_or_path, **kwargs)

    @hook
    def augment_model(
        self, model: PreTrainedModel, train_args: TrainingArguments, peft_config: PeftConfig | None
    ) -> tuple[PreTrainedModel, PeftConfig | None]:
        from .lora import add_moe_targets

        ep = self.settings.ep_size
        if getattr(model.config, "_experts_implementation", None) != IMPLEMENTATION:
            raise ConfigError(
                f"the model was loaded with experts_implementation "
                f"'{model.config._experts_implementation}', not '{IMPLEMENTATION}' (another "
                "plugin loads the model); switch one of them off"
            )
        if ep > 1:
            from accel.api import check_load_time_sharding_checkpoints

            from .parallel import check_sharded

            check_sharded(model, ep)
            check_load_time_sharding_checkpoints(train_args, f"--fast_moe {ep}")
        wants_lora = self.settings.lora_experts or self.settings.lora_router
        if wants_lora and peft_config is None:
            raise ConfigError(
                "lora_experts / lora_router need LoRA: pass --peft_method lora (with "
                "target_modules for the attention layers)"
            )
        if peft_config is not None and wants_lora:
            peft_config = add_moe_targets(
                model, peft_config, self.settings.lora_experts, self.settings.lora_router
            )
            if ep > 1 and self.settings.lora_experts:
                # the expert factors are sharded like the experts once PEFT made them, so the
                # adapters are applied here (the router's stay replicated, like attention's)
                from .lora import peft_model_with_sharded_experts

                model, peft_config = peft_model_with_sharded_experts(model, peft_config), None
        return model, peft_config

    @hook
    def report_lines(self) -> Sequence[str]:
        s = self.settings
        if s.ep_size > 1:
            layout = f"expert parallel over {s.ep_size} processes (transformers, all_to_all)"
        elif s.replicate_experts:
            layout = "experts replicated on every process"
        else:
            layout = "experts sharded like the other parameters"
        lines = [f"experts: {IMPLEMENTATION} kernel, {layout}"]
        if s.lora_experts or s.lora_router:
            parts = [n for n, on in (("experts", s.lora_experts), ("router", s.lora_router)) if on]
            lines.append(f"LoRA also on: {', '.join(parts)}")
        return lines

"""The two plugin classes of this package: padding-free training and multipack batching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from accel.api import AccelerationPlugin, ConfigError, Flag, hook

from .support import SUPPORTED_MODEL_TYPES, UNSUPPORTED_REASONS

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig
    from torch.utils.data import DataLoader
    from transformers import PreTrainedModel, TrainingArguments

    from .collator import PaddingFreeCollator

PADDING_FREE_PATH = "training.attention.padding_free"
MULTIPACK_PATH = "training.dataloader.multipack"


@dataclass
class PaddingFreeConfig:
    method: Literal["huggingface"] = field(
        default="huggingface",
        metadata={"help": "packed rows with position_ids restarting per example (no pad tokens)"},
    )


@dataclass
class MultipackConfig:
    num_processes: int = field(
        default=16, metadata={"help": "worker processes that compute example lengths (once)"}
    )
    max_tokens_per_rank: int | None = field(
        default=None,
        metadata={
            "help": "token budget of one micro-batch per rank; unset: as many steps as "
            "padded batches of per_device_train_batch_size would take"
        },
    )
    oversize: Literal["error", "report"] = field(
        default="error",
        metadata={
            "help": "an example longer than the budget: stop with an error, or skip it "
            "and report it"
        },
    )

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.max_tokens_per_rank is not None and self.max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be >= 1, got {self.max_tokens_per_rank}")


class PaddingFreePlugin(AccelerationPlugin):
    """Concatenates the examples of a batch into one row; attention never crosses examples."""

    name = "padding_free"
    config_paths = (PADDING_FREE_PATH,)
    config_schema = PaddingFreeConfig
    flags = (Flag("padding_free", PADDING_FREE_PATH, "method: huggingface", fields=("method",)),)
    #: the Supported entries of ``support.ARCHITECTURES`` (the core refuses the rest before
    #: loading the model; the table says why)
    model_types = SUPPORTED_MODEL_TYPES
    unsupported_reasons = UNSUPPORTED_REASONS

    def __init__(self, configs: dict[str, Any]) -> None:
        super().__init__(configs)
        self.attention_reason = "not chosen yet"

    @hook
    def augment_model(
        self, model: PreTrainedModel, train_args: TrainingArguments, peft_config: PeftConfig | None
    ) -> tuple[PreTrainedModel, PeftConfig | None]:
        from .attention import choose_attention_path, disable_kv_cache, register_varlen_attention
        from .support import config_refusal

        refusal = config_refusal(model.config)
        if refusal is not None:
            from accel.api import UnsupportedModelError

            raise UnsupportedModelError(f"padding_free: {refusal}")
        register_varlen_attention()
        choice = choose_attention_path(model.config, getattr(train_args, "device", None))
        model.set_attn_implementation(choice.implementation)
        disable_kv_cache(model)
        self.attention_reason = choice.reason
        return model, peft_config

    @hook
    def data_collator(self) -> PaddingFreeCollator:  # needs none of the hook's arguments
        from .collator import PaddingFreeCollator

        return PaddingFreeCollator()

    @hook
    def report_lines(self) -> Sequence[str]:
        return [f"attention: {self.attention_reason}", "use_cache: False (packed rows need it)"]


class MultipackPlugin(AccelerationPlugin):
    """Batches of balanced token counts per rank (needs padding_free)."""

    name = "multipack"
    config_paths = (MULTIPACK_PATH,)
    config_schema = MultipackConfig
    flags = (
        Flag(
            "multipack",
            MULTIPACK_PATH,
            "num_processes used to compute lengths, e.g. 16",
            fields=("num_processes",),
        ),
    )
    requires = ("padding_free",)
    model_types = SUPPORTED_MODEL_TYPES
    unsupported_reasons = UNSUPPORTED_REASONS

    @hook
    def train_dataloader(
        self, dataset: Dataset, collator: Any, train_args: TrainingArguments
    ) -> DataLoader:
        from .lengths import compute_lengths
        from .loader import EpochDataLoader
        from .multipack import MultipackBatchSampler

        if not hasattr(dataset, "__len__"):
            raise ConfigError(
                "multipack needs the length of every example up front, but the training "
                f"dataset is a {type(dataset).__name__} (iterable/streaming); use a map-style "
                "dataset or turn multipack off"
            )
        cfg: MultipackConfig = self.config()
        lengths = compute_lengths(dataset, num_proc=cfg.num_processes)
        budget = cfg.max_tokens_per_rank
        sampler = MultipackBatchSampler(
            lengths,
            num_replicas=train_args.world_size,
            rank=train_args.process_index,
            max_tokens_per_rank=budget,
            batch_size=None if budget else train_args.per_device_train_batch_size,
            seed=train_args.seed,
            oversize=cfg.oversize,
        )
        plan_line = (
            f"multipack: {len(lengths)} examples, {len(sampler)} steps per epoch, "
            f"{train_args.world_size} rank(s), "
            + (
                f"budget {budget} tokens/rank"
                if budget
                else f"bins sized like padded batches of {train_args.per_device_train_batch_size}"
            )
        )
        if train_args.process_index == 0:
            print(f"accel: {plan_line}", flush=True)
        return EpochDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=train_args.dataloader_num_workers,
        )

"""AccelTrainer: transformers' Trainer with the plugins' data loading and token counting.

Why transformers' Trainer and not TRL's SFTTrainer: TRL 1.x computes the SFT loss through
its own fused LM-head path (``model(..., fused_lm_head=True)``), which bypasses the model's
``loss_function`` — the extension point loss kernels plug into — and it refuses LoRA on
``lm_head``, which fms-hf-tuning's ``target_modules`` semantics allow. The data preparation
SFTTrainer would do (formatting, completion-only masks, truncation) lives in
:mod:`accel.trainer.data` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .checkpointing import CheckpointMixin


class AccelTrainer(CheckpointMixin, Trainer):
    def __init__(self, *args: Any, framework: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.framework = framework
        if framework.applies_label_smoothing:
            # a plugin's loss smooths the labels itself; the Trainer's smoother would pop the
            # labels and smooth the logits a second time
            self.label_smoother = None
        self.tokens_seen = 0  # every position fed to the model, padding included
        self.real_tokens_seen = 0  # positions that are not padding

    def get_train_dataloader(self) -> Any:
        loader = self.framework.train_dataloader(self.train_dataset, self.data_collator, self.args)
        if loader is not None:
            return loader  # already sharded per rank by its plugin
        return super().get_train_dataloader()

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        sampler = self.framework.train_sampler(self.train_dataset, self.args)
        return sampler if sampler is not None else super()._get_train_sampler(*args, **kwargs)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            self.tokens_seen += ids.numel()
            mask = inputs.get("attention_mask")
            self.real_tokens_seen += (
                int(mask.sum()) if isinstance(mask, torch.Tensor) else ids.numel()
            )
        return super().training_step(model, inputs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The final model is always a full Hugging Face model. Under FSDP with a sharded state
        dict, transformers' ``save_model`` writes nothing (the shards go into checkpoints), so
        for a final save the state dict type is switched to FULL_STATE_DICT for the duration:
        every rank joins the gather, rank 0 writes."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if _internal_call or not self.is_fsdp_enabled or plugin is None:
            return super().save_model(output_dir, _internal_call)
        if "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call)
        saved = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
        plugin.state_dict_config = plugin.optim_state_dict_config = None
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config) = (
                saved
            )

    def global_token_counts(self) -> tuple[int, int]:
        """Token counts summed over all processes."""
        counts = torch.tensor(
            [self.tokens_seen, self.real_tokens_seen], dtype=torch.long, device=self.args.device
        )
        counts = self.accelerator.reduce(counts, reduction="sum")
        return int(counts[0]), int(counts[1])

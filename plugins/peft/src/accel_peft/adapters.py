"""LoRA on a frozen 4-bit base, without PEFT's fp32 upcast of the frozen weights.

``peft.prepare_model_for_kbit_training`` casts every non-quantized frozen weight (norms,
embeddings, the output layer) to fp32: the main memory and speed cost of the common QLoRA
recipe. Here the base keeps ``torch_dtype``; only what training needs is done: every base
parameter frozen, input gradients on when activations are checkpointed (so the checkpointed
blocks see an input that requires grad), non-reentrant checkpointing, and the adapters created
in the training dtype.
"""

from __future__ import annotations

from typing import Any

from accel.api import ConfigError

LINEAR_CLASS_MODULES = ("bitsandbytes", "gptqmodel")


def is_quantized_linear(module: Any) -> bool:
    return type(module).__module__.startswith(LINEAR_CLASS_MODULES) and hasattr(
        module, "in_features"
    )


def quantized_linear_names(model: Any) -> list[str]:
    """fms-hf-tuning's ``all-linear`` on a quantized model: the last names of every quantized
    linear layer (the output layer is never quantized, so it is never among them)."""
    output = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name and module is not output and is_quantized_linear(module)
        }
    )


def freeze_base(model: Any, train_args: Any) -> None:
    """Freeze every base parameter; set up checkpointing for adapters on a frozen base."""
    for param in model.parameters():
        param.requires_grad_(False)
    if train_args.gradient_checkpointing:
        kwargs = dict(train_args.gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        train_args.gradient_checkpointing_kwargs = kwargs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()


def adapter_dtype(model: Any, train_args: Any) -> Any:
    """The training dtype; fp32 under fp16 mixed precision, whose gradient scaler refuses fp16
    gradients on the parameters it updates."""
    import torch

    if getattr(train_args, "fp16", False):
        return torch.float32
    return model.dtype


def add_adapters(model: Any, train_args: Any, peft_config: Any) -> Any:
    """``peft.get_peft_model`` on the frozen base; ``all-linear`` means every quantized linear."""
    import peft

    freeze_base(model, train_args)
    if peft_config.target_modules == "all-linear" or peft_config.target_modules == {"all-linear"}:
        names = quantized_linear_names(model)
        if not names:
            raise ConfigError(
                f"target_modules all-linear: {type(model).__name__} has no quantized linear layer"
            )
        peft_config.target_modules = set(names)
    peft_model = peft.get_peft_model(model, peft_config, autocast_adapter_dtype=False)
    dtype = adapter_dtype(model, train_args)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return peft_model


def common_recipe(model: Any, train_args: Any) -> Any:
    """``no_peft_model: true``: PEFT's own preparation (fp32 upcast included); the trainer then
    applies the adapters, as fms-acceleration's baseline does."""
    import peft

    kwargs = dict(train_args.gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", False)
    if train_args.gradient_checkpointing:
        train_args.gradient_checkpointing_kwargs = kwargs
    return peft.prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(train_args.gradient_checkpointing),
        gradient_checkpointing_kwargs=kwargs,
    )


def load_adapters(base_model: Any, adapter_dir: str, dtype: Any = None) -> Any:
    """Saved LoRA adapters on ``base_model``, in ``dtype`` (default: the dtype they were saved
    in, the training dtype). ``PeftModel.from_pretrained`` alone upcasts bf16/fp16 adapters to fp32, and puts
    adapters on a GPTQ base in fp16 whatever they trained in; either changes the logits."""
    from pathlib import Path

    import peft
    from safetensors.torch import load_file

    model = peft.PeftModel.from_pretrained(base_model, adapter_dir, autocast_adapter_dtype=False)
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return model
    saved = load_file(str(weights))
    dtypes = {t.dtype for t in saved.values() if t.is_floating_point()}
    if dtype is None and len(dtypes) == 1:
        dtype = dtypes.pop()
    if dtype is not None:
        for name, param in model.named_parameters():
            if "lora_" in name and param.dtype != dtype:
                param.data = param.data.to(dtype)
        peft.set_peft_model_state_dict(model, saved)
    return model

"""The plugins' load_model and augment_model hooks on real 4-bit bases: what the model looks
like after them, that a few optimizer steps train only the adapters, and that the adapters
saved in PEFT format reproduce the logits on a freshly loaded quantized base."""

from __future__ import annotations

import peft
import pytest
import torch
from peft_helpers import base_state, batch, lora_state, prepared_model, train_steps

from accel_peft.adapters import load_adapters


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (packed 4-bit codes stored as bf16 include NaN bit patterns)."""
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def _check_trains_adapters_only(model: torch.nn.Module, dtype: torch.dtype) -> None:
    before_base, before_lora = base_state(model), lora_state(model)
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    after_base, after_lora = base_state(model), lora_state(model)
    assert after_base.keys() == before_base.keys()
    for key, value in before_base.items():
        assert _same_bits(value, after_base[key]), f"base tensor {key} changed"
    changed = [k for k in before_lora if not torch.equal(before_lora[k], after_lora[k])]
    assert len(changed) == len(before_lora), "every LoRA tensor trains"
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {dtype}, "adapters in the training dtype"


def _reload_matches(model, tmp_path, load_base) -> None:
    model.eval()
    x = batch(seed=1)
    with torch.no_grad():
        expected = model(input_ids=x).logits.float()
    model.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    reloaded = load_adapters(load_base(), str(tmp_path / "adapters")).eval()
    assert {p.dtype for n, p in reloaded.named_parameters() if "lora_" in n} == {
        p.dtype for n, p in model.named_parameters() if "lora_" in n
    }
    with torch.no_grad():
        got = reloaded(input_ids=x).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_hooks_no_upcast_checkpointing_and_training(assets, tmp_path, quant_type):
    import bitsandbytes as bnb

    from accel_peft.loading import load_bnb_4bit

    model, args = prepared_model(
        {"bnb_qlora": [quant_type]}, assets / "llama", torch.bfloat16, gradient_checkpointing=True
    )
    base = model.get_base_model()
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 linears x 2 layers; lm_head stays dense
    state = quantized[0].weight.quant_state
    assert state.quant_type == quant_type and state.nested  # double quantization
    assert quantized[0].compute_dtype == torch.bfloat16
    assert quantized[0].weight.dtype == torch.bfloat16  # storage dtype: FSDP shards it
    # no fp32 upcast of the frozen dense weights (norms, embeddings, lm_head)
    frozen = {p.dtype for p in base.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert base.is_gradient_checkpointing
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert base.get_input_embeddings()(batch()).requires_grad  # input grads enabled
    lora_targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora_targets == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    _check_trains_adapters_only(model, torch.bfloat16)
    _reload_matches(
        model,
        tmp_path,
        lambda: load_bnb_4bit(str(assets / "llama"), {"dtype": torch.bfloat16}, quant_type),
    )


def test_no_peft_model_is_the_common_recipe(assets):
    """no_peft_model: the plugin loads in 4 bits and leaves the adapters to the trainer, after
    PEFT's prepare_model_for_kbit_training (frozen weights upcast to fp32)."""
    from transformers import TrainingArguments

    from accel import AccelerationFramework
    from accel.trainer.loading import default_loader

    framework = AccelerationFramework.from_sources(flags={"bnb_qlora": ["nf4", "true"]})
    model = framework.load_model(
        str(assets / "llama"), default=default_loader, dtype=torch.bfloat16
    )
    config = peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    args = TrainingArguments(str(assets / "np-out"), report_to=[])
    same, left = framework.augment_model(model, args, config)
    assert left is config and not isinstance(same, peft.PeftModel)
    assert same.get_input_embeddings().weight.dtype == torch.float32  # PEFT's upcast


@pytest.mark.parametrize(
    ("dtype", "fp16", "adapter_dtype"),
    [(torch.bfloat16, False, torch.bfloat16), (torch.float16, True, torch.float32)],
    ids=["bf16", "fp16-mixed-precision"],
)
def test_gptq_hooks_all_linear_and_training(gptq_dir, tmp_path, dtype, fp16, adapter_dtype):
    """bf16: adapters in bf16. --torch_dtype float16 --fp16: the fp16 gradient scaler updates
    fp32 parameters only, so the adapters are fp32 over the fp16 base."""
    from accel_peft.loading import GPTQ_PACKED, load_gptq

    model, _ = prepared_model({"auto_gptq": ["triton_v2"]}, gptq_dir, dtype, fp16=fp16)
    base = model.get_base_model()
    kinds = {type(m).__name__ for m in base.modules() if "gptqmodel" in type(m).__module__}
    assert kinds == {"TorchLinear"}  # the CPU backend
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "GPTQLoraLinear"]
    assert len(layers) == 14 and not any("lm_head" in n for n in layers)
    # the packed tensors are frozen parameters (FSDP shards them); the rest stays in dtype
    params = dict(base.named_parameters())
    packed = {n for n in params if n.rsplit(".", 1)[-1] in GPTQ_PACKED}
    assert len(packed) == 14 * 4  # qweight, qzeros, scales, g_idx (no bias)
    assert {params[n].dtype for n in packed} == {torch.int32, torch.float16}
    assert not any(n.rsplit(".", 1)[-1] in GPTQ_PACKED for n, _ in base.named_buffers())
    assert {p.dtype for n, p in params.items() if not p.requires_grad and n not in packed} == {
        dtype
    }
    _check_trains_adapters_only(model, adapter_dtype)
    _reload_matches(model, tmp_path, lambda: load_gptq(str(gptq_dir), {"dtype": dtype}))

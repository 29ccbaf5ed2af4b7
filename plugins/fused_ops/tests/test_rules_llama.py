"""The patch report on a 2-layer Llama, revert, and the process-wide RoPE reference count."""

from __future__ import annotations

import torch
import transformers.models.llama.modeling_llama as modeling_llama
from tiny_models import batches, tiny_model

from accel import AccelerationFramework, apply_patches
from accel_fused_ops.config import FusedOpsConfig
from accel_fused_ops.integration import rope as rope_patch
from accel_fused_ops.kernels.rope import apply_rotary_pos_emb as fused_rope
from accel_fused_ops.rules import build_rules

ALL = {
    "fast_loss": True,
    "fast_rms_layernorm": True,
    "fast_rope_embeddings": True,
    "fast_swiglu": True,
}
ORIGINAL_ROPE = modeling_llama.apply_rotary_pos_emb


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, target_modules=[*targets, "lm_head"])
    )


def _instance_patches(model) -> list[str]:
    found = [n for n, m in model.named_modules() if "forward" in vars(m)]
    return found + [n for n, m in model.named_modules() if "_loss_function" in vars(m)]


def test_framework_report_counts_every_rule():
    model = _lora_llama()
    framework = AccelerationFramework(
        sections={
            "training.fused_ops_and_kernels": ALL,
            "peft.quantization.fused_ops_and_kernels": {"base_layer": "plain", "fused_lora": True},
        }
    )
    applied = framework.apply_patches(model)
    try:
        assert applied.counts == {
            "fused_ops.lora_linear": 15,  # 7 projections x 2 layers + lm_head
            "fused_ops.rms_norm": 5,  # 2 per layer + the final norm
            "fused_ops.gated_mlp": 2,
            "fused_ops.rotary_embedding": 2,  # attention modules using the fused function
            "fused_ops.linear_cross_entropy_loss": 1,
        }
        report = framework.report()
        assert "fused_ops.rms_norm" in report and "-> 5 module(s)  [fast_rms_layernorm]" in report
        assert "apply_rotary_pos_emb is replaced in the modeling file" in report
        assert modeling_llama.apply_rotary_pos_emb is fused_rope
    finally:
        framework.revert_patches()
    assert _instance_patches(model) == []
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROPE


def test_cross_entropy_mode_patches_only_the_loss_function():
    model = tiny_model("llama")
    applied = apply_patches(model, build_rules(FusedOpsConfig(fast_loss="cross_entropy"), model))
    assert applied.counts == {"cross_entropy_loss": 1}
    assert _instance_patches(model) == [""]  # the root model's _loss_function only
    out = model(**batches(1)[0])
    assert out.logits is not None and out.loss.requires_grad
    applied.revert()
    assert _instance_patches(model) == []


def test_revert_restores_outputs_exactly():
    model = tiny_model("llama")
    batch = batches(1)[0]
    with torch.no_grad():
        before = model(**batch).logits
    applied = apply_patches(model, build_rules(FusedOpsConfig(**ALL), model))
    applied.revert()
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert _instance_patches(model) == []


def test_rope_stays_patched_until_the_last_model_is_reverted():
    first, second = tiny_model("llama"), tiny_model("llama")
    rope_only = FusedOpsConfig(fast_rope_embeddings=True)
    a = apply_patches(first, build_rules(rope_only, first))
    b = apply_patches(second, build_rules(rope_only, second))
    assert rope_patch.references(modeling_llama) == 4
    a.revert()
    assert rope_patch.references(modeling_llama) == 2
    assert modeling_llama.apply_rotary_pos_emb is fused_rope
    b.revert()
    assert rope_patch.references(modeling_llama) == 0
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROPE
    b.revert()  # reverting twice is harmless
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROPE

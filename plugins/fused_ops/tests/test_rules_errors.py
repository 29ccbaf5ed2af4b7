"""Requests the rules cannot honour: a PatchError naming model and feature, nothing patched."""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from tiny_models import tiny_model

from accel import AccelerationFramework, PatchError, UnsupportedModelError, apply_patches
from accel_fused_ops.config import FusedOpsConfig
from accel_fused_ops.rules import build_rules

ORIGINAL_ROPE = modeling_llama.apply_rotary_pos_emb


def _untouched(model) -> bool:
    return not any("forward" in vars(m) or "_loss_function" in vars(m) for m in model.modules())


def _lora(model, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))


@pytest.mark.parametrize(
    ("model_type", "switches", "message"),
    [
        (
            "gpt_bigcode",
            {"fast_loss": True, "fast_rms_layernorm": True},
            r"fast_rms_layernorm cannot patch GPTBigCodeForCausalLM \(model_type 'gpt_bigcode'\): "
            r"uses LayerNorm",
        ),
        (
            "gpt_bigcode",
            {"fast_rope_embeddings": True},
            r"fast_rope_embeddings cannot patch GPTBigCodeForCausalLM.*no rotary",
        ),
        (
            "mixtral",
            {"fast_rope_embeddings": True, "fast_swiglu": True},
            r"fast_swiglu cannot patch MixtralForCausalLM \(model_type 'mixtral'\): experts",
        ),
        (
            "gpt_oss",
            {"fast_swiglu": True},
            r"fast_swiglu cannot patch GptOssForCausalLM \(model_type 'gpt_oss'\): experts are "
            r"fused 3-D tensors inside GptOssExperts.*Supported model types: llama, mistral",
        ),
    ],
    ids=["gpt_bigcode-rms_norm", "gpt_bigcode-rope", "mixtral-swiglu", "gpt_oss-swiglu"],
)
def test_unsupported_feature_names_model_and_feature(model_type, switches, message):
    model = tiny_model(model_type)
    with pytest.raises(PatchError, match=message):
        build_rules(FusedOpsConfig(**switches), model)
    assert _untouched(model)


def test_feature_matching_nothing_is_an_error_and_reverts_the_rest():
    from transformers import LlamaModel

    model = LlamaModel(tiny_model("llama").config)  # no lm_head, no loss_function
    settings = FusedOpsConfig(fast_rope_embeddings=True, fast_loss=True)
    with pytest.raises(PatchError, match=r"'fast_loss' patched nothing in LlamaModel"):
        apply_patches(model, build_rules(settings, model))
    assert _untouched(model)
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROPE


def test_fused_lora_without_lora_layers():
    model = tiny_model("llama")
    settings = FusedOpsConfig(base_layer="plain", fused_lora=True)
    with pytest.raises(PatchError, match=r"LlamaForCausalLM has no PEFT LoRA linear layers"):
        build_rules(settings, model)


@pytest.mark.parametrize("base_layer", ["auto_gptq", "bitsandbytes"])
def test_fused_lora_base_layer_mismatch_says_what_was_found(base_layer):
    model = _lora(tiny_model("llama"))
    settings = FusedOpsConfig(base_layer=base_layer, fused_lora=True)
    with pytest.raises(PatchError, match=rf"base_layer is '{base_layer}'.*found 4 on plain"):
        build_rules(settings, model)


def test_fused_lora_refuses_dora_naming_the_layer():
    model = _lora(tiny_model("llama"), use_dora=True)
    settings = FusedOpsConfig(base_layer="plain", fused_lora=True, fast_rms_layernorm=True)
    with pytest.raises(
        PatchError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj'.*DoRA"
    ):
        build_rules(settings, model)
    assert _untouched(model)


def test_fused_linear_loss_refuses_a_biased_scaled_head():
    model = tiny_model("granite")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(PatchError, match=r"GraniteForCausalLM scales its logits.*bias"):
        build_rules(FusedOpsConfig(fast_loss=True), model)
    # the cross-entropy mode works on the scaled logits and is fine
    assert build_rules(FusedOpsConfig(fast_loss="cross_entropy"), model)


def test_framework_refuses_an_unsupported_architecture():
    from transformers import PhiConfig

    framework = AccelerationFramework(
        sections={"training.fused_ops_and_kernels": {"fast_loss": True}}
    )
    with pytest.raises(UnsupportedModelError, match=r"fused_ops.*'phi'.*supported: llama"):
        framework.check_model(PhiConfig())


def test_a_changed_forward_is_refused_not_mis_fused(monkeypatch):
    """The support table lists classes by name; a listed class whose forward is not the
    expected form (a future transformers release, a user subclass) is a PatchError."""
    from transformers.models.llama import modeling_llama as llama

    def scaled_norm(self, hidden_states):  # a different computation, same class name
        return 2.0 * self.weight * hidden_states

    def other_mlp(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    model = tiny_model("llama")
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", scaled_norm)
    with pytest.raises(PatchError, match=r"LlamaRMSNorm is not the llama-family RMSNorm forward"):
        build_rules(FusedOpsConfig(fast_rms_layernorm=True), model)
    monkeypatch.setattr(llama.LlamaMLP, "forward", other_mlp)
    with pytest.raises(PatchError, match=r"LlamaMLP is not the 'gate_up_down' gated MLP form"):
        build_rules(FusedOpsConfig(fast_swiglu=True), model)
    assert _untouched(model)


def test_an_unknown_rmsnorm_class_is_refused():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class CustomRMSNorm(torch.nn.Module):  # not a subclass of a listed class
        def __init__(self):
            super().__init__()
            self.inner = LlamaRMSNorm(8)

    model = tiny_model("llama")
    model.model.extra = CustomRMSNorm()
    with pytest.raises(
        PatchError, match=r"'model.extra': no fused RMSNorm equivalent.*CustomRMSNorm"
    ):
        build_rules(FusedOpsConfig(fast_rms_layernorm=True), model)

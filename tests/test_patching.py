"""Declarative patch rules on real (tiny) transformers models: counts, errors, revert."""

from __future__ import annotations

import pytest
import torch
from plugin_fixtures import infos
from transformers import LlamaForCausalLM

from accel import AccelerationFramework, AccelerationPlugin, PatchError, PatchRule, apply_patches
from accel.patching import set_attribute
from accel.testing import tiny_model


def tiny_llama() -> LlamaForCausalLM:
    return tiny_model("llama")


def doubled_norm(module):
    original = module.forward
    return lambda hidden_states: original(hidden_states) * 2


def test_forward_rule_counts_and_reverts():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids).logits
    rule = PatchRule(
        "double_norm", "doubling", module_classes=("LlamaRMSNorm",), forward=doubled_norm
    )
    applied = apply_patches(model, [rule])
    assert applied.counts == {"double_norm": 5}  # 2 layers x 2 norms + final norm
    assert not torch.allclose(model(ids).logits, before)
    assert "double_norm -> 5 module(s)  [doubling]" in applied.lines()[0]
    applied.revert()
    assert torch.allclose(model(ids).logits, before)
    assert all("forward" not in vars(m) for m in model.modules())


def test_replace_and_apply_rules_revert():
    model = tiny_llama()
    old_mlp = model.model.layers[0].mlp
    rules = [
        PatchRule(
            "identity_mlp",
            "swap",
            module_classes=("LlamaMLP",),
            match=lambda m: m is old_mlp,
            replace=lambda m: torch.nn.Identity(),
        ),
        PatchRule(
            "loss",
            "loss",
            module_classes=("LlamaForCausalLM",),
            apply=lambda m: set_attribute(m, "_loss_function", lambda *a, **k: torch.tensor(0.0)),
        ),
    ]
    applied = apply_patches(model, rules)
    assert applied.counts == {"identity_mlp": 1, "loss": 1}
    assert isinstance(model.model.layers[0].mlp, torch.nn.Identity)
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids, labels=ids).loss.item() == 0.0
    applied.revert()
    assert model.model.layers[0].mlp is old_mlp
    assert model(ids, labels=ids).loss.item() > 0


def test_feature_that_patches_nothing_is_an_error_naming_model_and_feature():
    model = tiny_model("gpt_bigcode")
    rule = PatchRule(
        "rms", "fast_rms_layernorm", module_classes=("LlamaRMSNorm",), forward=doubled_norm
    )
    with pytest.raises(PatchError) as err:
        apply_patches(model, [rule])
    assert "fast_rms_layernorm" in str(err.value)
    assert "GPTBigCodeForCausalLM" in str(err.value) and "gpt_bigcode" in str(err.value)


def test_model_type_filter():
    model = tiny_llama()
    rule = PatchRule(
        "rms", "f", module_classes=("LlamaRMSNorm",), model_types=("mistral",), forward=doubled_norm
    )
    with pytest.raises(PatchError):
        apply_patches(model, [rule])


def test_failed_feature_reverts_everything_already_applied():
    model = tiny_llama()
    ok = PatchRule("ok", "a", module_classes=("LlamaRMSNorm",), forward=doubled_norm)
    empty = PatchRule("empty", "b", module_classes=("NoSuchModule",), forward=doubled_norm)
    with pytest.raises(PatchError):
        apply_patches(model, [ok, empty])
    assert all("forward" not in vars(m) for m in model.modules())


class DoubleNormPlugin(AccelerationPlugin):
    name = "double_norm"
    config_paths = ("training.double_norm",)

    def patch_rules(self, model):
        return [PatchRule("rms", "double", module_classes=("LlamaRMSNorm",), forward=doubled_norm)]


def test_two_frameworks_patch_their_own_models_only():
    available = infos(DoubleNormPlugin)
    patched = AccelerationFramework(
        {"plugins": {"training": {"double_norm": {}}}}, available=available
    )
    plain = AccelerationFramework(None, available=available)
    m1, m2 = tiny_llama(), tiny_llama()
    ids = torch.tensor([[4, 5, 6]])
    ref = m2(ids).logits
    report = patched.apply_patches(m1)
    plain.apply_patches(m2)
    assert report.counts == {"double_norm.rms": 5}
    assert "double_norm.rms -> 5 module(s)" in patched.report()
    assert torch.allclose(m2(ids).logits, ref)  # the other framework's model is untouched
    assert not torch.allclose(m1(ids).logits, ref)
    patched.revert_patches()
    assert torch.allclose(m1(ids).logits, ref)


def test_rule_that_raises_midway_leaves_model_unpatched():
    model = tiny_llama()

    def failing(module):
        raise RuntimeError("cannot patch this one")

    ok = PatchRule("ok", "a", module_classes=("LlamaRMSNorm",), forward=doubled_norm)
    bad = PatchRule("bad", "b", module_classes=("LlamaMLP",), forward=failing)
    with pytest.raises(RuntimeError, match="cannot patch"):
        apply_patches(model, [ok, bad])
    assert all("forward" not in vars(m) for m in model.modules())

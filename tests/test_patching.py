"""Declarative patch rules on real (tiny) transformers models: counts, errors, revert."""

from __future__ import annotations

import pytest
import torch
from plugin_fixtures import infos
from transformers import LlamaForCausalLM

from accel import (
    AccelerationFramework,
    AccelerationPlugin,
    PatchError,
    PatchRule,
    apply_patches,
    hook,
)
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

    @hook
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
    with pytest.raises(RuntimeError, match="cannot patch") as err:
        apply_patches(model, [ok, bad])
    assert all("forward" not in vars(m) for m in model.modules())
    assert "accel: raised by patch rule 'bad' on 'model.layers.0.mlp' (LlamaMLP)" in (
        err.value.__notes__
    )


# ------------------------------------------------- several plugins: one transaction, composition

NORM = ("LlamaRMSNorm",)


def rms_reference(module, x):
    """What the unpatched module computes (the class's forward)."""
    return type(module).forward(module, x)


def patching_plugin(name: str, *rules: PatchRule, **attrs) -> type[AccelerationPlugin]:
    def patch_rules(self, model):
        return list(rules)

    return type(
        name,
        (AccelerationPlugin,),
        {"name": name, "config_paths": (f"training.{name}",), "patch_rules": hook(patch_rules)}
        | attrs,
    )


def framework_of(*classes: type[AccelerationPlugin]) -> AccelerationFramework:
    tree = {c.name: {} for c in classes}
    return AccelerationFramework({"plugins": {"training": tree}}, available=infos(*classes))


def replace_times_two(module):
    """A replacement forward: computes the norm itself (never calls the previous forward)."""
    return lambda hidden_states: rms_reference(module, hidden_states) * 2


def wrap_plus_one(module, forward):
    return lambda hidden_states: forward(hidden_states) + 1


def wrap_times_three(module, forward):
    return lambda *args, **kwargs: forward(*args, **kwargs) * 3


def unpatched(model) -> bool:
    return all("forward" not in vars(m) for m in model.modules())


def test_a_misspelt_module_class_is_named_beside_the_models_own():
    typo = patching_plugin(
        "typo", PatchRule("mlp", "fast_mlp", module_classes=("LlamaMlp",), forward=doubled_norm)
    )
    with pytest.raises(PatchError) as err:
        framework_of(typo).apply_patches(tiny_llama())
    assert "looked for module class(es) LlamaMlp; this model has LlamaMLP" in str(err.value)


def test_a_failing_plugin_leaves_no_patch_of_any_plugin():
    good = patching_plugin(
        "aa_good", PatchRule("rms", "double", module_classes=NORM, forward=doubled_norm)
    )
    empty = patching_plugin(
        "zz_empty",
        PatchRule("gone", "missing", module_classes=("NoSuchModule",), forward=doubled_norm),
    )
    model = tiny_llama()
    fw = framework_of(good, empty)
    with pytest.raises(PatchError, match="'missing' patched nothing.*zz_empty.gone"):
        fw.apply_patches(model)
    assert unpatched(model) and fw.patches is None

    def refuse(self, model):
        raise PatchError("cannot patch this model")

    raising = patching_plugin("zz_raising", patch_rules=hook(refuse))
    with pytest.raises(PatchError, match=r"plugin 'zz_raising' \(patch_rules\)"):
        framework_of(good, raising).apply_patches(model)
    assert unpatched(model)


@pytest.mark.parametrize("names", [("aa_replace", "zz_wrap"), ("zz_replace", "aa_wrap")])
def test_wrapper_runs_around_another_plugins_replacement_in_any_order(names):
    replacer = patching_plugin(
        names[0], PatchRule("rms", "fast_norm", module_classes=NORM, forward=replace_times_two)
    )
    wrapper = patching_plugin(
        names[1], PatchRule("rms", "count_norm", module_classes=NORM, wrap=wrap_plus_one)
    )
    model = tiny_llama()
    fw = framework_of(replacer, wrapper)
    applied = fw.apply_patches(model)
    assert applied.counts == {f"{names[0]}.rms": 5, f"{names[1]}.rms": 5}
    norm = model.model.norm
    x = torch.randn(1, 3, 32)
    torch.testing.assert_close(norm(x), rms_reference(norm, x) * 2 + 1)  # both ran
    fw.revert_patches()
    assert unpatched(model)
    torch.testing.assert_close(norm(x), rms_reference(norm, x))


@pytest.mark.parametrize("outer_first", [False, True])
def test_two_wrappers_compose_in_plugin_order_later_outermost(outer_first):
    """Two plugins wrap every LlamaMLP: the later plugin in the resolved order is outermost."""
    plus = patching_plugin(
        "plus",
        PatchRule("mlp", "plus", module_classes=("LlamaMLP",), wrap=wrap_plus_one),
        **({"after": ("times",)} if outer_first else {}),
    )
    times = patching_plugin(
        "times", PatchRule("mlp", "times", module_classes=("LlamaMLP",), wrap=wrap_times_three)
    )
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    x = torch.randn(1, 3, 32)
    plain = mlp(x)
    fw = framework_of(plus, times)
    assert fw.names == (["times", "plus"] if outer_first else ["plus", "times"])
    fw.apply_patches(model)
    expected = plain * 3 + 1 if outer_first else (plain + 1) * 3
    torch.testing.assert_close(mlp(x), expected)
    fw.revert_patches()
    torch.testing.assert_close(mlp(x), plain)


def test_two_replacements_of_one_forward_fail_naming_both_rules():
    first = patching_plugin(
        "first", PatchRule("rms", "a", module_classes=NORM, forward=replace_times_two)
    )
    second = patching_plugin(
        "second", PatchRule("norm", "b", module_classes=NORM, forward=replace_times_two)
    )
    model = tiny_llama()
    with pytest.raises(
        PatchError,
        match=r"'first\.rms' and 'second\.norm' both replace the forward of "
        r"'model\.layers\.0\.input_layernorm' \(LlamaRMSNorm\).*wrap=",
    ):
        framework_of(first, second).apply_patches(model)
    assert unpatched(model)


def test_forward_over_one_an_apply_rule_set_is_a_conflict():
    def set_head_forward(model):
        head = model.lm_head
        return set_attribute(head, "forward", lambda hidden: head.__class__.forward(head, hidden))

    loss = patching_plugin(
        "loss",
        PatchRule("head", "loss", module_classes=("LlamaForCausalLM",), apply=set_head_forward),
    )
    other = patching_plugin(
        "other",
        PatchRule(
            "head",
            "other",
            match=lambda m: isinstance(m, torch.nn.Linear) and m.out_features == 64,
            forward=lambda m: m.forward,
        ),
    )
    model = tiny_llama()
    with pytest.raises(
        PatchError, match=r"'loss\.head' and 'other\.head' both replace the forward of 'lm_head'"
    ):
        framework_of(loss, other).apply_patches(model)
    assert unpatched(model)


def test_replaced_module_cannot_be_patched_by_another_rule():
    swap = patching_plugin(
        "swap",
        PatchRule(
            "mlp", "swap", module_classes=("LlamaMLP",), replace=lambda m: torch.nn.Identity()
        ),
    )
    fwd = patching_plugin(
        "fwd", PatchRule("mlp", "fwd", module_classes=("LlamaMLP",), forward=lambda m: m.forward)
    )
    model = tiny_llama()
    old = model.model.layers[0].mlp
    with pytest.raises(
        PatchError, match=r"'fwd\.mlp' and 'swap\.mlp' both patch 'model\.layers\.0\.mlp'"
    ):
        framework_of(swap, fwd).apply_patches(model)
    assert model.model.layers[0].mlp is old and unpatched(model)


def test_third_party_wrapper_runs_under_fused_ops_whatever_the_names():
    """The real fused_ops RMSNorm replacement and a plugin named to sort before it."""
    from accel.registry import discover_plugins

    available = discover_plugins()
    if "fused_ops" not in available:
        pytest.skip("fused_ops is not installed")
    calls, inner = [], set()

    def counting(module, forward):
        inner.add(forward.__qualname__)  # what the wrapper wraps: fused_ops' forward

        def wrapped(hidden_states):
            calls.append(type(module).__name__)
            return forward(hidden_states)

        return wrapped

    counter = patching_plugin(
        "aaa_counter", PatchRule("count", "count_norm", module_classes=NORM, wrap=counting)
    )
    config = {
        "plugins": {
            "training": {"aaa_counter": {}, "fused_ops_and_kernels": {"fast_rms_layernorm": True}}
        }
    }
    fw = AccelerationFramework(config, available={**available, **infos(counter)})
    assert fw.names == ["aaa_counter", "fused_ops"]
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = model(ids).logits
    applied = fw.apply_patches(model)
    assert applied.counts == {"aaa_counter.count": 5, "fused_ops.rms_norm": 5}
    logits = model(ids).logits
    assert inner == {"rms_norm_forward.<locals>.forward"}
    assert calls.count("LlamaRMSNorm") == 5  # the wrapper ran on every norm
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)  # and the fused norm
    fw.revert_patches()
    assert unpatched(model)

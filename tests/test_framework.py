"""Activation, ordering and conflict rules of AccelerationFramework."""

from __future__ import annotations

import pytest
from plugin_fixtures import (
    Conflicting,
    FutureCore,
    KernelsPlugin,
    LoaderPlugin,
    NeedsGhost,
    NeedsKernels,
    NeedsPackage,
    OtherLoaderPlugin,
    infos,
)

from accel import (
    AccelerationFramework,
    AccelerationPlugin,
    PluginConflictError,
    PluginRequirementError,
    UnsupportedModelError,
    hook,
)

ALL = infos(
    KernelsPlugin,
    LoaderPlugin,
    OtherLoaderPlugin,
    NeedsKernels,
    NeedsGhost,
    Conflicting,
    FutureCore,
    NeedsPackage,
)


def cfg(*paths: str) -> dict:
    tree: dict = {}
    for path in paths:
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = {}
    return {"plugins": tree}


def test_empty_config_activates_nothing():
    assert AccelerationFramework(None, available=ALL).plugins == []


def test_two_model_loaders_conflict_before_anything_runs():
    with pytest.raises(
        PluginConflictError, match="'loader' and 'other_loader' both implement 'load_model'"
    ):
        AccelerationFramework(
            cfg("peft.quantization.loader", "peft.quantization.other_loader"), available=ALL
        )


def test_single_loader_owns_loading():
    fw = AccelerationFramework(cfg("peft.quantization.loader"), available=ALL)
    loaded = fw.load_model("m", default=lambda name, **kw: "default", dtype="bfloat16")
    assert loaded == ("loaded-by-plugin", "m", {"dtype": "bfloat16"})
    fw2 = AccelerationFramework(None, available=ALL)
    assert fw2.load_model("m", default=lambda name, **kw: ("default", kw), dtype="x") == (
        "default",
        {"dtype": "x"},
    )


def test_required_plugin_not_active_says_how_to_activate():
    with pytest.raises(PluginRequirementError) as err:
        AccelerationFramework(cfg("training.needs_kernels"), available=ALL)
    assert "requires plugin 'kernels'" in str(err.value)
    assert "plugins.training.kernels" in str(err.value) and "--kernels" in str(err.value)


def test_required_plugin_ordering():
    fw = AccelerationFramework(cfg("training.needs_kernels", "training.kernels"), available=ALL)
    assert fw.names == ["kernels", "needs_kernels"]


def test_required_plugin_absent():
    with pytest.raises(
        PluginRequirementError, match="requires plugin 'ghost', which is not installed"
    ):
        AccelerationFramework(cfg("training.needs_ghost"), available=ALL)


def test_declared_conflict():
    with pytest.raises(
        PluginConflictError, match="'conflicting' and 'kernels' cannot be active together"
    ):
        AccelerationFramework(cfg("training.conflicting", "training.kernels"), available=ALL)


def test_core_version_range_excludes_this_core():
    with pytest.raises(
        PluginRequirementError, match=r"works with accel >=9.0, but this is accel 0\.1"
    ):
        AccelerationFramework(cfg("training.future_core"), available=ALL)


def test_missing_required_package_names_pip_command():
    with pytest.raises(
        PluginRequirementError, match="pip install 'surely-not-an-installed-package>=1.0'"
    ):
        AccelerationFramework(cfg("training.needs_package"), available=ALL)


def test_unsupported_architecture():
    from transformers import GPTBigCodeConfig, LlamaConfig, Qwen2Config

    fw = AccelerationFramework(cfg("training.kernels"), available=ALL)
    fw.check_model(LlamaConfig())
    with pytest.raises(
        UnsupportedModelError,
        match="'kernels' does not support model_type 'gpt_bigcode' .GPTBigCodeConfig.: its "
        "fused qkv projection is not handled; supported: llama, mistral",
    ):
        fw.check_model(GPTBigCodeConfig())
    with pytest.raises(UnsupportedModelError, match=r"'qwen2' \(Qwen2Config\); supported"):
        fw.check_model(Qwen2Config())  # no reason on record: none invented


def test_ordering_cycle_detected():
    class A(AccelerationPlugin):
        name = "a"
        config_paths = ("training.a",)
        after = ("b",)

    class B(AccelerationPlugin):
        name = "b"
        config_paths = ("training.b",)
        after = ("a",)

    with pytest.raises(PluginConflictError, match="cycle"):
        AccelerationFramework(cfg("training.a", "training.b"), available=infos(A, B))


def test_before_and_after_order_chained_hooks():
    calls = []

    class First(AccelerationPlugin):
        name = "zz_first"
        config_paths = ("training.first",)
        before = ("aa_second",)

        @hook
        def augment_model(self, model, train_args, peft_config):
            calls.append(self.name)
            return model + ["first"], peft_config

    class Second(AccelerationPlugin):
        name = "aa_second"
        config_paths = ("training.second",)

        @hook
        def augment_model(self, model, peft_config):  # a subset of the spec's parameters
            calls.append(self.name)
            return model + ["second"], None

    fw = AccelerationFramework(
        cfg("training.first", "training.second"), available=infos(First, Second)
    )
    model, peft_config = fw.augment_model([], None, "lora")
    assert model == ["first", "second"] and peft_config is None
    assert calls == ["zz_first", "aa_second"]


def test_two_frameworks_do_not_interfere():
    fw1 = AccelerationFramework(cfg("training.kernels"), available=ALL)
    fw2 = AccelerationFramework(cfg("peft.quantization.loader"), available=ALL)
    assert fw1.names == ["kernels"] and fw2.names == ["loader"]
    assert fw1.load_model("x", default=lambda n: "default") == "default"
    assert fw2.load_model("x", default=lambda n: "default") == ("loaded-by-plugin", "x", {})
    assert fw1.plugins[0] is not fw2.plugins[0]


def test_report_names_plugins_packages_versions():
    fw = AccelerationFramework(cfg("training.kernels"), available=ALL)
    report = fw.report()
    assert "kernels (test-plugins 0.0)" in report and "plugins.training.kernels" in report


def test_report_lists_each_sections_settings_that_differ_from_the_defaults():
    """Two paths of one plugin share a schema; the start-of-run block must not show one
    path switching the other's features off."""
    fw = AccelerationFramework.from_sources(
        flags={"kernels": ["True", "False"], "lora_kernels": ["bitsandbytes", "true"]},
        available=ALL,
    )
    lines = {line.split(":")[0].strip(): line for line in fw.report().splitlines()}
    assert lines["plugins.training.kernels"].endswith(": fast_loss=True")
    assert "fast_loss" not in lines["plugins.peft.quantization.kernels"]
    assert "base_layer='bitsandbytes'" in lines["plugins.peft.quantization.kernels"]

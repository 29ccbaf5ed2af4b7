"""The hook contract: the spec table, the one dispatcher, and the checks at class definition."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from plugin_fixtures import infos

from accel import AccelerationFramework, AccelerationPlugin, ConfigError, PatchError, hook
from accel.hookspecs import SPECS, TRAINER_CALLBACK_EVENTS, Combine


def plugin(name: str, **attrs) -> type[AccelerationPlugin]:
    """A plugin class activated by ``training.<name>``."""
    return type(
        name.title(),
        (AccelerationPlugin,),
        {"name": name, "config_paths": (f"training.{name}",), **attrs},
    )


def framework(*classes: type[AccelerationPlugin]) -> AccelerationFramework:
    tree = {c.config_paths[0].split(".")[1]: {} for c in classes}
    return AccelerationFramework({"plugins": {"training": tree}}, available=infos(*classes))


# ------------------------------------------------------------------------------- the table


def test_every_hook_has_a_spec_with_a_docstring():
    assert list(SPECS) == [
        "check_run",
        "load_model",
        "augment_model",
        "patch_rules",
        "prepare_dataset",
        "data_collator",
        "train_sampler",
        "train_dataloader",
        "callbacks",
        "on_save",
        "export",
        "trained_examples",
        "report_lines",
    ]
    combine = {name: spec.combine for name, spec in SPECS.items()}
    assert combine["load_model"] is Combine.SINGLE and combine["train_dataloader"] is Combine.SINGLE
    assert combine["augment_model"] is Combine.CHAINED and SPECS["augment_model"].threads == (
        "model",
        "peft_config",
    )
    assert combine["callbacks"] is Combine.FANOUT and SPECS["callbacks"].joins
    assert all(spec.doc for spec in SPECS.values())


def test_trainer_callback_events_match_transformers():
    from transformers import TrainerCallback

    events = {n for n in vars(TrainerCallback) if n.startswith("on_")}
    assert set(TRAINER_CALLBACK_EVENTS) == events


def test_plugin_contract_imports_no_heavy_library():
    code = (
        "import sys\nimport accel.plugin, accel.hookspecs, accel.framework\n"
        "print([m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# ------------------------------------------------------------------ checks at class definition


@pytest.mark.parametrize("helper", ["exporter", "train_loader", "prepare_data", "load_models"])
def test_helper_names_close_to_hooks_are_allowed(helper):
    cls = plugin("helpers", **{helper: lambda self: 1})
    assert not cls.implements(helper) and cls._accel_hooks == {}


def test_misspelt_hook_is_refused_with_the_closest_name():
    with pytest.raises(TypeError, match="'augment_modle' is marked @hook but is not a hook. Did "):

        class Typo(AccelerationPlugin):
            @hook
            def augment_modle(self, model, train_args, peft_config):
                return model, peft_config


def test_hook_without_marker_is_refused():
    with pytest.raises(
        TypeError, match=r"defines 'export' without @hook.*def export\(self, model, output_dir\)"
    ):

        class Unmarked(AccelerationPlugin):
            def export(self, model, output_dir):
                pass


@pytest.mark.parametrize(
    "event", ["on_train_begin", "on_step_end", "on_log", "on_epoch_end", "on_save_checkpoint"]
)
@pytest.mark.parametrize("marked", [False, True])
def test_trainer_events_on_a_plugin_point_to_callbacks(event, marked):
    def method(self, args, state, control, **kwargs):
        pass

    with pytest.raises(TypeError, match=rf"'{event}'.*never receives.*'callbacks' hook"):
        plugin("events", **{event: hook(method) if marked else method})


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        ("self, model, train_args, peft_config, extra", "parameter 'extra' is not an argument"),
        ("self, model, peft_config, scale=2.0", "parameter 'scale' is not an argument"),
        ("self, model, train_arg, peft_config", r"'train_arg' \(did you mean 'train_args'\?\)"),
        ("self, *args", "parameter 'args' can never receive a value"),
        ("self, model, /, peft_config", "parameter 'model' can never receive a value"),
    ],
)
def test_signature_that_does_not_fit_the_spec_is_refused(signature, reason):
    namespace: dict = {}
    exec(f"def augment_model({signature}):\n    return None", namespace)
    with pytest.raises(TypeError, match=reason):
        plugin("bad", augment_model=hook(namespace["augment_model"]))


def test_on_save_is_an_accel_hook_with_its_own_arguments():
    cls = plugin("saver", on_save=hook(lambda self, checkpoint_dir, model: None))
    assert cls.implements("on_save")
    with pytest.raises(TypeError, match="parameter 'args' is not an argument"):
        plugin("hf_style", on_save=hook(lambda self, args, state, control, **kw: None))


def test_hook_as_staticmethod_is_refused():
    with pytest.raises(TypeError, match="must be a plain method"):
        plugin("static", report_lines=staticmethod(hook(lambda: ["x"])))


def test_subclass_inherits_and_overrides_hooks():
    class Base(AccelerationPlugin):
        name = "base"
        config_paths = ("training.base",)

        @hook
        def report_lines(self):
            return ["base"]

        @hook
        def export(self, model, output_dir):
            pass

    class Child(Base):
        name = "child"
        config_paths = ("training.child",)

        @hook
        def report_lines(self):
            return ["child"]

    assert Child.implements("export") and Child.implements("report_lines")
    assert "      child" in framework(Child).report()


# ------------------------------------------------------------------------------ dispatch


def test_keywords_reach_each_implementation_as_declared():
    seen = {}

    class Subset(AccelerationPlugin):
        name = "subset"
        config_paths = ("training.subset",)

        @hook
        def prepare_dataset(self, train_args, dataset):  # order is free, tokenizer not taken
            seen["subset"] = (dataset, train_args)
            return dataset + ["subset"]

    class Everything(AccelerationPlugin):
        name = "everything"
        config_paths = ("training.everything",)
        after = ("subset",)

        @hook
        def prepare_dataset(self, **kwargs):
            seen["everything"] = sorted(kwargs)
            return kwargs["dataset"] + ["everything"]

    fw = framework(Subset, Everything)
    assert fw.prepare_dataset(["raw"], "tok", "args") == ["raw", "subset", "everything"]
    assert seen == {
        "subset": (["raw"], "args"),
        "everything": ["dataset", "tokenizer", "train_args"],
    }


def test_single_owner_result_or_default():
    class Collating(AccelerationPlugin):
        name = "collating"
        config_paths = ("training.collating",)

        @hook
        def data_collator(self, default):
            return ("wrapped", default)

    class Declining(AccelerationPlugin):
        name = "declining"
        config_paths = ("training.declining",)

        @hook
        def train_sampler(self):
            return None  # keep the trainer's own sampler

    assert framework(Collating).data_collator("tok", "args", "dflt") == ("wrapped", "dflt")
    assert framework(Declining).data_collator("tok", "args", "dflt") == "dflt"
    assert framework(Declining).train_sampler([1], "args") is None


def test_fan_out_joins_in_plugin_order_and_runs_every_side_effect():
    calls = []

    def make(name, **attrs):
        return plugin(
            name,
            callbacks=hook(lambda self: [f"{self.name}-cb"]),
            export=hook(lambda self, output_dir: calls.append((self.name, output_dir))),
            **attrs,
        )

    fw = framework(make("zeta", before=("alpha",)), make("alpha"))
    assert fw.callbacks("model", "accelerator") == ["zeta-cb", "alpha-cb"]
    assert fw.export("model", "/out") is None
    assert calls == [("zeta", "/out"), ("alpha", "/out")]


def test_chained_hook_returning_the_wrong_shape_names_plugin_and_hook():
    bad = plugin("bad_chain", augment_model=hook(lambda self, model: model))
    with pytest.raises(
        TypeError,
        match=r"'bad_chain': hook 'augment_model' must return the tuple \(model, peft_config\)",
    ):
        framework(bad).augment_model("m", None, None)
    empty = plugin("empty_chain", prepare_dataset=hook(lambda self, dataset: None))
    with pytest.raises(TypeError, match="'empty_chain': hook 'prepare_dataset' returned None"):
        framework(empty).prepare_dataset([], None, None)


def test_joined_hook_returning_a_non_list_names_plugin_and_hook():
    bad = plugin("bad_lines", report_lines=hook(lambda self: "one line"))
    with pytest.raises(TypeError, match="'bad_lines': hook 'report_lines' must return a list"):
        framework(bad).report()


def test_user_facing_error_from_a_plugin_names_plugin_and_hook():
    def refuse(self, dataset):
        raise ConfigError("plugins.training.picky.size: 3 is too small; use at least 8")

    fw = framework(plugin("picky", prepare_dataset=hook(refuse)))
    with pytest.raises(ConfigError) as err:
        fw.prepare_dataset([], None, None)
    assert str(err.value) == (
        "plugin 'picky' (prepare_dataset): plugins.training.picky.size: 3 is too small; "
        "use at least 8"
    )


def test_unexpected_error_keeps_its_type_with_a_note_naming_plugin_and_hook():
    def broken(self, model):
        raise ZeroDivisionError("bug")

    fw = framework(plugin("buggy", callbacks=hook(broken)))
    with pytest.raises(ZeroDivisionError, match="bug") as err:
        fw.callbacks("model", None)
    assert "accel: raised by plugin 'buggy' in hook 'callbacks'" in getattr(
        err.value, "__notes__", []
    )


def test_core_must_call_hooks_with_the_spec_parameters():
    fw = framework(plugin("any"))
    with pytest.raises(TypeError, match="hook 'export' takes model, output_dir"):
        fw.call("export", model="m")
    with pytest.raises(TypeError, match="no hook named 'exporter'"):
        fw.call("exporter")


def test_trace_logs_plugin_hook_and_time(monkeypatch, caplog):
    monkeypatch.setenv("ACCEL_TRACE", "1")
    fw = framework(plugin("traced", report_lines=hook(lambda self: ["x"])))
    with caplog.at_level(logging.INFO, logger="accel"):
        fw.report()
    assert any(
        r.getMessage().startswith("accel trace: traced.report_lines took ") for r in caplog.records
    )


def test_two_loader_owners_conflict_across_sampler_and_dataloader():
    from accel import PluginConflictError

    a = plugin("sampling", train_sampler=hook(lambda self: None))
    b = plugin("loading", train_dataloader=hook(lambda self: None))
    with pytest.raises(PluginConflictError, match="both build the training loader"):
        framework(a, b)


def test_patch_error_raised_in_patch_rules_keeps_its_class():
    def refuse(self, model):
        raise PatchError("fast_thing cannot patch TinyModel")

    fw = framework(plugin("patcher", patch_rules=hook(refuse)))
    with pytest.raises(PatchError, match=r"^plugin 'patcher' \(patch_rules\): fast_thing"):
        fw.apply_patches(object())
    assert fw.patches is None


# ----------------------------------------------------------------------- through the CLI


def test_multipack_over_budget_is_one_error_line_exit_2(base_args, tmp_path):
    """A user's budget smaller than the examples: raised inside the trainer's loader, reported
    as one `accel: error:` line naming plugin, hook and the fix."""
    config = tmp_path / "accel.yaml"
    config.write_text(
        "plugins:\n  training:\n    attention:\n      padding_free:\n        method: huggingface\n"
        "    dataloader:\n      multipack:\n        num_processes: 1\n        max_tokens_per_rank: 4\n"
    )
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({**base_args, "acceleration_config": str(config)}))
    out = subprocess.run(
        [sys.executable, "-m", "accel.cli", "train", str(run_json)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("accel: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith("accel: error: plugin 'multipack' (train_dataloader): ")
    assert "longer than max_tokens_per_rank=4" in errors[0] and "oversize='report'" in errors[0]

"""Config files, schemas and flags: every user error names the key and the fix.

Plugin options come from an acceleration config (file or sample name), a run config's
``plugins:`` mapping and the acceleration flags; ``AccelerationFramework.from_sources`` merges
them in one place with typed comparison.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
from plugin_fixtures import KernelsPlugin, infos

import accel
from accel import AccelerationFramework, AccelerationPlugin, ConfigError, PluginNotInstalledError
from accel.registry import discover_plugins
from accel.samples import samples

AVAILABLE = infos(KernelsPlugin)


def framework(config=None, sections=None):
    return AccelerationFramework(config, sections=sections, available=AVAILABLE)


def from_sources(config=None, *, plugins=None, flags=None, available=AVAILABLE):
    return AccelerationFramework.from_sources(
        config, plugins=plugins, flags=flags, available=available
    )


def kernels_yaml(tmp_path, body: str, name: str = "accel.yaml"):
    path = tmp_path / name
    path.write_text("plugins:\n  training:\n    kernels:\n" + body)
    return path


needs_fused_ops = pytest.mark.skipif(
    "fused_ops" not in discover_plugins(), reason="fused_ops plugin not installed"
)


# ------------------------------------------------------------------ acceleration config files
def test_yaml_file_activates_plugin_with_typed_config(tmp_path):
    fw = framework(kernels_yaml(tmp_path, "      fast_loss: true\n      mode: triton\n"))
    assert fw.names == ["kernels"]
    cfg = fw.plugins[0].config("training.kernels")
    assert (cfg.fast_loss, cfg.fast_rms_layernorm, cfg.mode) == (True, False, "triton")


def test_unknown_option_names_path_lists_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        framework({"plugins": {"training": {"kernels": {"fast_los": True}}}})
    msg = str(err.value)
    assert "plugins.training.kernels" in msg and "unknown key 'fast_los'" in msg
    assert "Did you mean 'fast_loss'?" in msg and "fast_rms_layernorm" in msg


def test_unknown_path_segment_suggests_closest():
    with pytest.raises(ConfigError) as err:
        framework({"plugins": {"trainig": {"kernels": {}}}})
    assert "unknown key 'trainig'" in str(err.value)
    assert "Did you mean 'training'?" in str(err.value)


def test_bad_value_type_and_literal():
    with pytest.raises(ConfigError, match=r"fast_loss: got 'maybe', expected true or false"):
        framework({"plugins": {"training": {"kernels": {"fast_loss": "maybe"}}}})
    with pytest.raises(ConfigError, match=r"mode: got 'tritn'.*Did you mean 'triton'"):
        framework({"plugins": {"training": {"kernels": {"mode": "tritn"}}}})


def test_yaml_values_keep_their_type_a_quoted_bool_is_an_error(tmp_path):
    """Only command-line words are parsed; YAML can say true, so "true" is a mistake."""
    path = kernels_yaml(tmp_path, '      fast_loss: "true"\n')
    with pytest.raises(ConfigError) as err:
        framework(path)
    assert "plugins.training.kernels.fast_loss: got 'true', expected true or false" in str(
        err.value
    )
    assert "(write true without quotes)" in str(err.value)
    assert str(path) in str(err.value)  # names the file the value came from


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("plugins:\n  training:\n    kernels: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        framework(path)


def test_missing_file_directory_and_wrong_root(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        framework(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory; give a YAML file or a sample name"):
        framework(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown top-level key 'plugin'.*Did you mean 'plugins'"):
        framework({"plugin": {}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("plugins:\n", "has an empty 'plugins:'"),
        ("plugins: {}\n", "has an empty 'plugins:'"),
        ("plugins:\n  training: {}\n", "names no plugin config path"),
        ("other: 1\n", "unknown top-level key 'other'"),
    ],
)
def test_an_acceleration_config_that_activates_nothing_is_an_error(tmp_path, text, expected):
    """A file the user passed explicitly must switch something on (see load_acceleration_config)."""
    path = tmp_path / "accel.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        framework(path)
    assert "accel.yaml" in str(err.value)


def test_first_party_path_without_plugin_names_install_command():
    with pytest.raises(PluginNotInstalledError) as err:
        framework({"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 2}}}}})
    assert "accel-moe" in str(err.value)
    assert "python -m accel.cli install moe" in str(err.value)


# ---------------------------------------------------------------------------------- flags
def test_flag_is_the_trimmed_one_from_accel_flags():
    from accel.flags import Flag
    from accel.plugin import Flag as PluginFlag

    assert accel.Flag is Flag is PluginFlag
    assert [f.name for f in dataclasses.fields(Flag)] == ["name", "path", "help", "fields", "nargs"]


def test_flag_values_keep_their_types():
    flag = KernelsPlugin.flags[0]
    assert flag.to_config([True, False]) == {"fast_loss": True, "fast_rms_layernorm": False}
    assert flag.to_config(["True", "no"]) == {"fast_loss": "True", "fast_rms_layernorm": "no"}
    fw = from_sources(flags={"kernels": [True, "no"]})
    cfg = fw.plugins[0].config("training.kernels")
    assert cfg.fast_loss is True and cfg.fast_rms_layernorm is False


@dataclass
class SwitchConfig:
    scale: float = 1.0


class SwitchPlugin(AccelerationPlugin):
    name = "switch"
    config_paths = ("training.switch",)
    config_schema = SwitchConfig
    flags = (accel.Flag("my_feature", "training.switch", "on/off"),)


SWITCH = infos(SwitchPlugin)


@pytest.mark.parametrize(
    ("argv", "active"),
    [
        (["--my_feature"], True),
        (["--my_feature", "True"], True),
        (["--my_feature", "yes"], True),
        (["--my_feature", "false"], False),
        (["--my_feature", "0"], False),
    ],
)
def test_flag_without_fields_is_an_on_off_switch(argv, active):
    from accel.trainer.parsing import parse_argv

    config = parse_argv(argv, SWITCH)
    fw = from_sources(flags=config.flags, available=SWITCH)
    assert fw.names == (["switch"] if active else [])
    if active:
        assert fw.get("switch").config() == SwitchConfig()  # the schema's defaults


@pytest.mark.parametrize(("value", "active"), [(True, True), (False, False), ([], True)])
def test_switch_from_python(value, active):
    fw = from_sources(flags={"my_feature": value}, available=SWITCH)
    assert fw.names == (["switch"] if active else [])


def test_switch_refuses_other_values():
    flag = SwitchPlugin.flags[0]
    assert flag.usage() == "--my_feature [true|false]"
    with pytest.raises(ConfigError, match=r"--my_feature: got 'maybe', expected true or false"):
        from_sources(flags={"my_feature": ["maybe"]}, available=SWITCH)
    with pytest.raises(ConfigError, match=r"got 2 value\(s\).*expected 0 or 1"):
        from_sources(flags={"my_feature": [True, True]}, available=SWITCH)


def test_flag_of_missing_plugin_names_install_command():
    with pytest.raises(PluginNotInstalledError, match="--padding_free.*install attention_packing"):
        from_sources(flags={"padding_free": ["huggingface"]})


def test_flags_to_two_paths_of_one_plugin_both_kept():
    """Two flags of one plugin fill two paths; neither may drop the other."""
    fw = from_sources(flags={"kernels": ["True", "True"], "lora_kernels": ["auto_gptq", "True"]})
    plugin = fw.plugins[0]
    assert plugin.config("training.kernels").fast_loss is True
    assert plugin.config("training.kernels").fast_rms_layernorm is True
    assert plugin.config("peft.quantization.kernels").base_layer == "auto_gptq"
    assert plugin.config("peft.quantization.kernels").fused_lora is True


def test_flag_value_count_and_values_checked():
    with pytest.raises(ConfigError, match=r"--kernels: got 1 value\(s\).*expected 2"):
        from_sources(flags={"kernels": ["True"]})
    with pytest.raises(ConfigError, match="--kernels: .*fast_loss: got 'yes-please'"):
        from_sources(flags={"kernels": ["yes-please", "True"]})


def test_sections_argument_still_reads_flag_words():
    fw = framework(sections={"training.kernels": {"fast_loss": "True"}})
    assert fw.plugins[0].config("training.kernels").fast_loss is True


# --------------------------------------------------------------------------- merging sources
def test_same_value_from_flag_and_file_is_not_an_error(tmp_path):
    path = kernels_yaml(tmp_path, "      fast_loss: true\n      fast_rms_layernorm: false\n")
    fw = from_sources(path, flags={"kernels": ["True", "False"]})
    cfg = fw.plugins[0].config("training.kernels")
    assert (cfg.fast_loss, cfg.fast_rms_layernorm) == (True, False)


def test_flag_and_file_disagreeing_is_an_error_naming_both(tmp_path):
    path = kernels_yaml(tmp_path, "      fast_loss: true\n")
    with pytest.raises(ConfigError) as err:
        from_sources(path, flags={"kernels": ["False", "True"]})
    msg = str(err.value)
    assert "plugins.training.kernels.fast_loss is True from acceleration config" in msg
    assert str(path) in msg and "but False from --kernels" in msg


def test_a_flag_typed_on_the_command_line_overrides_the_files(tmp_path):
    """One rule, as for every other option: the command line overrides the files (the
    acceleration config and the run config's ``plugins:``)."""
    path = kernels_yaml(tmp_path, "      fast_loss: true\n      fast_rms_layernorm: true\n")
    fw = AccelerationFramework.from_sources(
        path,
        plugins={"training": {"kernels": {"fast_loss": True, "mode": "torch"}}},
        flags={"kernels": ["False", "True"]},
        available=AVAILABLE,
        command_line={"kernels"},
    )
    cfg = fw.plugins[0].config("training.kernels")
    assert (cfg.fast_loss, cfg.fast_rms_layernorm, cfg.mode) == (False, True, "torch")


def test_run_file_plugins_and_a_command_line_flag(tmp_path):
    """End to end through ``accel train``'s parser: the run file's ``plugins:`` section and
    the same plugin's flag typed after it (the flag wins); the same flag written in the run
    file is the file's own value, and disagreeing with its ``plugins:`` is an error."""
    from accel.trainer.parsing import parse_argv
    from accel.trainer.run import build_framework

    available = discover_plugins()
    section = {"training": {"fused_ops_and_kernels": {"fast_loss": False}}}
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model_name_or_path": "m", "plugins": section}))
    config = parse_argv([str(run), "--fast_kernels", "True", "True", "True"], available)
    settings = (
        build_framework(config, available).get("fused_ops").config("training.fused_ops_and_kernels")
    )
    assert (settings.fast_loss, settings.fast_rms_layernorm) == (True, True)

    run.write_text(
        json.dumps(
            {"model_name_or_path": "m", "plugins": section, "fast_kernels": [True, True, True]}
        )
    )
    config = parse_argv([str(run)], available)
    with pytest.raises(ConfigError, match="fast_loss is False from the run config.*give one value"):
        build_framework(config, available)


def test_every_bad_flag_is_reported_together():
    from accel.errors import ErrorList

    with pytest.raises(ErrorList) as err:
        from_sources(flags={"kernels": ["True"], "lora_kernels": ["bitsandbytes", "maybe"]})
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("--kernels") and lines[1].startswith("--lora_kernels"), lines


def test_one_and_true_are_different_settings():
    @dataclass
    class Knob:
        level: int | bool = 0

    class KnobPlugin(AccelerationPlugin):
        name = "knob"
        config_paths = ("training.knob",)
        config_schema = Knob

    with pytest.raises(ConfigError, match="level is 1 from acceleration config but True from"):
        AccelerationFramework.from_sources(
            {"plugins": {"training": {"knob": {"level": 1}}}},
            plugins={"training": {"knob": {"level": True}}},
            available=infos(KnobPlugin),
        )


def test_flag_and_file_complementing_each_other_merge():
    fw = from_sources(
        {"plugins": {"training": {"kernels": {"fast_loss": True}}}},
        flags={"lora_kernels": ["bitsandbytes", "true"]},
    )
    plugin = fw.plugins[0]
    assert plugin.config("training.kernels").fast_loss is True
    assert plugin.config("peft.quantization.kernels").base_layer == "bitsandbytes"


def test_run_config_plugins_mapping_sets_options_beyond_the_flag():
    fw = from_sources(
        plugins={"training": {"kernels": {"mode": "torch"}}}, flags={"kernels": [True, True]}
    )
    cfg = fw.plugins[0].config("training.kernels")
    assert (cfg.fast_loss, cfg.fast_rms_layernorm, cfg.mode) == (True, True, "torch")


def test_run_config_plugins_mapping_errors_name_it():
    with pytest.raises(ConfigError, match=r"run config's 'plugins'.*unknown key 'mod'"):
        from_sources(plugins={"training": {"kernels": {"mod": "torch"}}})
    with pytest.raises(ConfigError, match="run config's 'plugins' is empty"):
        from_sources(plugins={})
    with pytest.raises(ConfigError, match="expected a mapping of config paths"):
        from_sources(plugins=["training.kernels"])


# ------------------------------------------------------------------- sections that do nothing
@dataclass
class SwitchesConfig:
    fast_a: bool = False
    fast_b: bool = False

    def enables_nothing(self) -> bool:
        return not (self.fast_a or self.fast_b)


class SwitchesPlugin(AccelerationPlugin):
    name = "switches"
    config_paths = ("training.switches",)
    config_schema = SwitchesConfig
    flags = (accel.Flag("switches", "training.switches", "a b", fields=("fast_a", "fast_b")),)


def test_a_section_whose_schema_says_it_enables_nothing_is_an_error():
    available = infos(SwitchesPlugin)
    with pytest.raises(ConfigError) as err:
        from_sources(flags={"switches": ["False", "False"]}, available=available)
    assert "plugins.training.switches (from --switches) switches nothing on" in str(err.value)
    with pytest.raises(ConfigError, match="switches nothing on"):
        from_sources({"plugins": {"training": {"switches": None}}}, available=available)
    fw = from_sources(flags={"switches": ["False", "True"]}, available=available)
    assert fw.names == ["switches"]


@needs_fused_ops
def test_fast_kernels_all_off_is_an_error():
    with pytest.raises(ConfigError, match=r"plugins.training.fused_ops_and_kernels .*nothing on"):
        AccelerationFramework.from_sources(flags={"fast_kernels": ["False", "False", "False"]})
    off = {"fast_loss": False, "fast_rms_layernorm": False, "fast_rope_embeddings": False}
    with pytest.raises(ConfigError, match="switches nothing on"):
        AccelerationFramework.from_sources(
            {"plugins": {"training": {"fused_ops_and_kernels": off}}}
        )


# ---------------------------------------------------------------- the trainer's config path
@needs_fused_ops
def test_real_flag_and_sample_with_the_same_values_merge():
    """``--fast_kernels True True True`` with the fast-kernels sample (fast_loss: true ...)."""
    fw = AccelerationFramework.from_sources(
        "fast-kernels", flags={"fast_kernels": ["True", "True", "True"]}
    )
    settings = fw.get("fused_ops").settings
    assert settings.fast_loss is True and settings.fast_rope_embeddings is True
    with pytest.raises(ConfigError, match=r"fast_swiglu is True from acceleration config '.*"):
        AccelerationFramework.from_sources(
            "fast-kernels-swiglu", flags={"fast_kernels": ["True", "True", "True", "False"]}
        )


@needs_fused_ops
def test_run_config_with_plugins_key_and_sample_name(tmp_path):
    from accel.trainer.parsing import parse_argv, parse_mapping
    from accel.trainer.run import build_framework

    available = discover_plugins()
    run = {
        "model_name_or_path": "m",
        "training_data_path": "d",
        "acceleration_config": "fast-kernels",
        "plugins": {"training": {"fused_ops_and_kernels": {"fast_swiglu": True}}},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    for config in (parse_mapping(run, available), parse_argv([str(path)], available)):
        settings = build_framework(config, available).get("fused_ops").settings
        assert settings.fast_swiglu is True and settings.fast_loss is True
    bare = tmp_path / "run.yaml"
    bare.write_text("model_name_or_path: m\ntraining_data_path: d\nplugins:\n")
    with pytest.raises(ConfigError, match="run config's 'plugins' is empty"):
        build_framework(parse_argv([str(bare)], available), available)


def test_acceleration_config_names_a_sample_or_a_file(tmp_path, monkeypatch):
    from accel.samples import resolve_config_file

    found = samples()
    assert {"fast-kernels", "padding-free"} <= set(found)
    assert resolve_config_file("fast-kernels") == found["fast-kernels"]
    own = tmp_path / "fast-kernels"  # a user's own file is never shadowed by a sample
    own.write_text("plugins: {}\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_file("fast-kernels").resolve() == own.resolve()
    with pytest.raises(ConfigError, match="'fast-kernel' is neither.*Did you mean 'fast-kernels'"):
        resolve_config_file("fast-kernel")


@pytest.mark.skipif(
    "padding_free" not in discover_plugins(), reason="attention_packing not installed"
)
def test_accel_arguments_validates_with_the_trainers_error(tmp_path):
    """A misspelt key: the same message from `accel arguments` as from `accel train`."""
    from accel.cli.configs import config_to_flags
    from accel.trainer.parsing import parse_mapping
    from accel.trainer.run import build_framework

    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n  training:\n    attention:\n      padding_free:\n        methd: x\n")
    available = discover_plugins()
    run = {"model_name_or_path": "m", "training_data_path": "d", "acceleration_config": str(bad)}
    with pytest.raises(accel.AccelError) as from_train:
        build_framework(parse_mapping(run, available), available)
    with pytest.raises(accel.AccelError) as from_arguments:
        config_to_flags(bad)
    assert str(from_arguments.value) == str(from_train.value)
    out = subprocess.run(
        [sys.executable, "-m", "accel.cli", "arguments", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"accel: error: {from_train.value}\n"

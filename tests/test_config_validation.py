"""Config files, schemas and flags: every user error names the key and the fix."""

from __future__ import annotations

import pytest
from plugin_fixtures import KernelsPlugin, infos

from accel import AccelerationFramework, ConfigError, PluginNotInstalledError
from accel.flags import sections_from_flags


def framework(config=None, sections=None):
    return AccelerationFramework(config, sections=sections, available=infos(KernelsPlugin))


def test_yaml_file_activates_plugin_with_typed_config(tmp_path):
    path = tmp_path / "accel.yaml"
    path.write_text(
        "plugins:\n  training:\n    kernels:\n      fast_loss: true\n      mode: triton\n"
    )
    fw = framework(path)
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
    assert "unknown key 'trainig'" in str(err.value) and "Did you mean 'training'?" in str(
        err.value
    )


def test_bad_value_type_and_literal():
    with pytest.raises(ConfigError, match=r"fast_loss: got 'maybe', expected true or false"):
        framework({"plugins": {"training": {"kernels": {"fast_loss": "maybe"}}}})
    with pytest.raises(ConfigError, match=r"mode: got 'tritn'.*Did you mean 'triton'"):
        framework({"plugins": {"training": {"kernels": {"mode": "tritn"}}}})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("plugins:\n  training:\n    kernels: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        framework(path)


def test_missing_file_and_wrong_root(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        framework(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown top-level key 'plugin'.*Did you mean 'plugins'"):
        framework({"plugin": {}})


def test_first_party_path_without_plugin_names_install_command():
    with pytest.raises(PluginNotInstalledError) as err:
        framework({"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 2}}}}})
    assert "accel-moe" in str(err.value)
    assert "python -m accel.cli install moe" in str(err.value)


def test_flag_of_missing_plugin_names_install_command():
    with pytest.raises(PluginNotInstalledError, match="--padding_free.*install attention_packing"):
        sections_from_flags({"padding_free": ["huggingface"]}, infos(KernelsPlugin))


def test_flags_to_two_paths_of_one_plugin_both_kept():
    """Two flags of one plugin fill two paths; neither may drop the other."""
    sections = sections_from_flags(
        {"kernels": ["True", "True"], "lora_kernels": ["auto_gptq", "True"]}, infos(KernelsPlugin)
    )
    fw = framework(sections=sections)
    plugin = fw.plugins[0]
    assert plugin.config("training.kernels").fast_loss is True
    assert plugin.config("training.kernels").fast_rms_layernorm is True
    assert plugin.config("peft.quantization.kernels").base_layer == "auto_gptq"
    assert plugin.config("peft.quantization.kernels").fused_lora is True


def test_flag_value_count_and_values_checked():
    with pytest.raises(ConfigError, match=r"--kernels: got 1 value\(s\).*expected 2"):
        sections_from_flags({"kernels": ["True"]}, infos(KernelsPlugin))
    sections = sections_from_flags({"kernels": ["yes-please", "True"]}, infos(KernelsPlugin))
    with pytest.raises(ConfigError, match="fast_loss: got 'yes-please'"):
        framework(sections=sections)


def test_flag_and_file_disagreeing_is_an_error():
    sections = sections_from_flags({"kernels": ["False", "True"]}, infos(KernelsPlugin))
    with pytest.raises(ConfigError, match="fast_loss"):
        framework({"plugins": {"training": {"kernels": {"fast_loss": True}}}}, sections=sections)


def test_flag_and_file_complementing_each_other_merge():
    sections = sections_from_flags({"lora_kernels": ["bitsandbytes", "true"]}, infos(KernelsPlugin))
    fw = framework({"plugins": {"training": {"kernels": {"fast_loss": True}}}}, sections=sections)
    plugin = fw.plugins[0]
    assert plugin.config("training.kernels").fast_loss is True
    assert plugin.config("peft.quantization.kernels").base_layer == "bitsandbytes"

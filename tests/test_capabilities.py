"""What plugins declare as data (capabilities) and the ``check_run`` hook, read by the core
without knowing any plugin: the quantized checkpoint rule, the base layer other plugins see,
the data mixer, and the label smoother a plugin's loss replaces."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from plugin_fixtures import infos

from accel import AccelerationFramework
from accel.api import AccelerationPlugin, BaseLayer, ConfigError, Flag, hook
from accel.trainer.datamix import check_mixer, mixer_types


class QuantLoader(AccelerationPlugin):
    name = "quant_loader"
    config_paths = ("peft.quantization.quant_loader",)
    flags = (Flag("quant_loader", "peft.quantization.quant_loader", "on", fields=()),)
    usage = "--quant_loader q4"
    base_layer = "q4"
    quant_methods = ("q4m",)


class Watcher(AccelerationPlugin):
    """Records what check_run received; refuses a run without LoRA."""

    name = "watcher"
    config_paths = ("training.watcher",)

    @hook
    def check_run(self, run_config: Any, model_config: Any, base_layer: BaseLayer | None) -> None:
        self.seen = (run_config, model_config, base_layer)
        if run_config.tuning.peft_method != "lora":
            raise ConfigError("watcher needs --peft_method lora")
        self.applies_label_smoothing = True


class Mixer(AccelerationPlugin):
    name = "mixer"
    config_paths = ("training.mixer",)
    flags = (Flag("mixer", "training.mixer", "on", fields=()),)
    data_mixer = "online"

    @hook
    def trained_examples(self) -> dict[str, int]:
        return {"a": 3, "b": 1}


ALL = infos(QuantLoader, Watcher, Mixer)


def _framework(*paths: str) -> AccelerationFramework:
    tree: dict = {}
    for path in paths:
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = {}
    return AccelerationFramework({"plugins": tree} if tree else None, available=ALL)


def _run(peft_method: str = "lora", data_config: str | None = None) -> Any:
    return SimpleNamespace(
        tuning=SimpleNamespace(peft_method=peft_method),
        data=SimpleNamespace(data_config=data_config),
    )


def _model_config(method: str | None) -> Any:
    quant = {"quant_method": method} if method else None
    return SimpleNamespace(model_type="llama", quantization_config=quant)


def test_check_run_sees_the_base_layer_and_can_refuse():
    fw = _framework("peft.quantization.quant_loader", "training.watcher")
    run, model_config = _run(), _model_config(None)
    fw.check_run(run, model_config)
    watcher = fw.get("watcher")
    assert watcher.seen == (run, model_config, BaseLayer("q4", "quant_loader", "--quant_loader q4"))
    assert fw.applies_label_smoothing
    with pytest.raises(ConfigError, match=r"plugin 'watcher' \(check_run\): watcher needs --peft"):
        fw.check_run(_run("none"), model_config)


def test_without_a_loading_plugin_the_base_layer_is_none():
    fw = _framework("training.watcher")
    fw.check_run(_run(), _model_config(None))
    assert fw.get("watcher").seen[2] is None
    assert not _framework().applies_label_smoothing


def test_a_quantized_checkpoint_needs_a_plugin_that_declares_its_method():
    with pytest.raises(ConfigError) as err:
        _framework("training.watcher").check_model(_model_config("q4m"), "/models/m")
    assert str(err.value) == (
        "model '/models/m' is a Q4M checkpoint (quant_method 'q4m' in its config.json); "
        "plugin 'quant_loader' trains on it: pass --quant_loader q4"
    )
    _framework("peft.quantization.quant_loader").check_model(_model_config("q4m"))
    # a method no installed plugin declares is left to transformers
    _framework().check_model(_model_config("unknown"))


def test_data_mixers_come_from_the_declarations(tmp_path):
    assert mixer_types(ALL) == ["default", "online"]
    config = tmp_path / "dc.yaml"
    config.write_text(
        "dataprocessor: {type: online, online: {rate: 2}}\n"
        "datasets:\n  - {name: a, data_paths: [a.jsonl]}\n  - {name: b, data_paths: [b.jsonl]}\n"
    )
    from accel.trainer.datamix import read_data_config

    assert dict(read_data_config(str(config), mixer_types(ALL)).options) == {"rate": 2}
    with pytest.raises(ConfigError, match="needs the mixer plugin: pass --mixer, or set type"):
        check_mixer(_run(data_config=str(config)), _framework())
    check_mixer(_run(data_config=str(config)), _framework("training.mixer"))
    with pytest.raises(ConfigError, match="the mixer plugin mixes .* there is no data_config"):
        check_mixer(_run(), _framework("training.mixer"))
    assert _framework("training.mixer").trained_examples() == {"a": 3, "b": 1}
    assert _framework().trained_examples() is None


def test_options_of_another_mixer_are_refused(tmp_path):
    config = tmp_path / "dc.yaml"
    config.write_text(
        "dataprocessor: {type: default, online: {rate: 2}}\n"
        "datasets:\n  - {name: a, data_paths: [a.jsonl]}\n"
    )
    from accel.trainer.datamix import read_data_config

    with pytest.raises(ConfigError, match="dataprocessor.online is set but dataprocessor.type"):
        read_data_config(str(config), mixer_types(ALL))

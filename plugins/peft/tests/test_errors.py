"""Every user error of the plugins and their commands: one ``accel: error:`` line naming the
flag, key, file or value and the fix, exit status 2, no traceback; checked before the model
loads wherever the information exists then."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from peft_helpers import train_argv

from accel import AccelerationFramework
from accel.cli.main import main as cli_main
from accel.errors import PluginRequirementError
from accel.registry import PluginInfo
from accel_peft.plugins import AutoGPTQPlugin, BitsAndBytesPlugin


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # transformers may draw a loading progress bar first; the error is one line of its own
    errors = [line for line in err.splitlines() if "accel: error: " in line]
    assert len(errors) == 1 and errors[0].startswith("accel: error: "), err
    assert err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_bnb_and_gptq_together(assets, capsys):
    argv = train_argv(assets, assets / "llama", "--bnb_qlora", "nf4", "--auto_gptq", "triton_v2")
    err = _error(capsys, argv)
    assert re.search(
        r"plugins '(bitsandbytes|auto_gptq)' and '(bitsandbytes|auto_gptq)' cannot", err
    )


@pytest.mark.parametrize(
    ("flags", "method", "expected"),
    [
        (["--bnb_qlora", "nf4"], "none", "not full fine-tuning; pass --peft_method lora"),
        (["--bnb_qlora", "nf4"], "pt", "not peft_method 'pt'; pass --peft_method lora"),
        (["--auto_gptq", "triton_v2"], "none", "not full fine-tuning; pass --peft_method lora"),
    ],
)
def test_quantized_base_needs_lora(assets, gptq_dir, capsys, flags, method, expected):
    model = gptq_dir if "--auto_gptq" in flags else assets / "llama"
    argv = [*train_argv(assets, model, *flags), "--peft_method", method]
    assert expected in _error(capsys, argv)


def test_auto_gptq_on_a_model_that_is_not_gptq(assets, capsys):
    err = _error(capsys, train_argv(assets, assets / "llama", "--auto_gptq", "triton_v2"))
    assert "--auto_gptq needs a GPTQ checkpoint" in err and "accel quantize" in err


def test_gptq_checkpoint_without_auto_gptq(assets, gptq_dir, capsys):
    err = _error(capsys, train_argv(assets, gptq_dir))
    assert "is a GPTQ checkpoint" in err and "--auto_gptq triton_v2" in err
    err = _error(capsys, train_argv(assets, gptq_dir, "--bnb_qlora", "nf4"))
    assert "is a GPTQ checkpoint" in err and "--auto_gptq triton_v2" in err


def test_from_quantized_false(assets, gptq_dir, capsys):
    err = _error(capsys, train_argv(assets, gptq_dir, "--auto_gptq", "triton_v2", "false"))
    assert "plugins.peft.quantization.auto_gptq" in err and "accel quantize" in err


@pytest.fixture(scope="module")
def unloadable(assets, tmp_path_factory):
    """A model folder that passes every check before loading (config.json, complete weights)
    but fails to load: its config's hidden size does not match the weights."""
    bad = tmp_path_factory.mktemp("unloadable") / "llama"
    shutil.copytree(assets / "llama", bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    return bad


def test_fused_lora_naming_the_other_base_fails_before_loading(assets, unloadable, capsys):
    # the folder cannot load (next test), so this error was raised before loading
    argv = train_argv(assets, unloadable, "--bnb_qlora", "nf4", "--fused_lora", "auto_gptq")
    err = _error(capsys, [*argv, "True"])
    assert (
        "--fused_lora auto_gptq True: fused_lora's base_layer is 'auto_gptq', but the base is "
        "loaded by plugin 'bitsandbytes' (--bnb_qlora nf4), so the LoRA layers sit on "
        "bitsandbytes layers; pass --fused_lora bitsandbytes True"
    ) in err


def test_the_unloadable_model_fails_in_loading(assets, unloadable):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cli_main(train_argv(assets, unloadable, "--bnb_qlora", "nf4"))


def test_fused_lora_naming_the_other_base_gptq(assets, gptq_dir, capsys):
    argv = train_argv(assets, gptq_dir, "--auto_gptq", "triton_v2", "--fused_lora")
    err = _error(capsys, [*argv, "bitsandbytes", "True"])
    assert "but the base is loaded by plugin 'auto_gptq' (--auto_gptq triton_v2)" in err
    assert "pass --fused_lora auto_gptq True" in err


@pytest.mark.parametrize("kind", ["bnb", "gptq"])
def test_fsdp_size_refusal_says_why_and_what_works(assets, gptq_dir, kind):
    from accel.errors import ConfigError
    from accel_peft.loading import load_bnb_4bit, load_gptq

    sharded = {"distributed_config": object()}  # what the core passes for fsdp_size
    with pytest.raises(ConfigError) as err:
        if kind == "bnb":
            load_bnb_4bit(str(assets / "llama"), sharded, "nf4")
        else:
            load_gptq(str(gptq_dir), sharded)
    message = str(err.value)
    why = "which those shards no longer describe" if kind == "bnb" else "FSDP replicates"
    assert "cannot be combined with fsdp_size" in message and why in message
    assert "Drop fsdp_size" in message and "fsdp_version 2" in message


def test_checkpoint_bits_gptqmodel_cannot_train(assets, gptq_dir, tmp_path, capsys):
    bad = tmp_path / "gptq-3bit"
    shutil.copytree(gptq_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    err = _error(capsys, train_argv(assets, bad, "--auto_gptq", "triton_v2"))
    assert "GPTQ bits 3 is not supported" in err and "2, 4, 8" in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--bits", "3"], "GPTQ bits 3 is not supported"),
        (["--group_size", "100"], "GPTQ group_size 100 is not supported"),
    ],
)
def test_quantize_bad_bits_or_group_size(assets, tmp_path, capsys, options, expected):
    argv = ["quantize", str(assets / "llama"), str(tmp_path / "q")]
    err = _error(capsys, [*argv, "--calibration", str(assets / "train.jsonl"), *options])
    assert expected in err and not (tmp_path / "q").exists()


def test_quantize_never_overwrites_and_refuses_a_quantized_model(
    assets, gptq_dir, tmp_path, capsys
):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    calibration = ["--calibration", str(assets / "train.jsonl")]
    err = _error(capsys, ["quantize", str(assets / "llama"), str(target), *calibration])
    assert "is not empty" in err and (target / "mine.txt").read_text() == "keep"
    err = _error(capsys, ["quantize", str(gptq_dir), str(tmp_path / "q2"), *calibration])
    assert "already quantized (quant_method 'gptq')" in err
    err = _error(
        capsys,
        [
            "quantize",
            str(assets / "llama"),
            str(tmp_path / "q3"),
            "--calibration",
            str(tmp_path / "none.jsonl"),
        ],
    )
    assert "--calibration" in err and "is not a file" in err


def test_export_needs_an_adapter_folder(assets, tmp_path, capsys):
    err = _error(capsys, ["export", "merged", str(assets / "llama"), str(tmp_path / "m")])
    assert "holds no adapter_config.json" in err


def test_required_packages_and_missing_package_message(tmp_path):
    assert BitsAndBytesPlugin.required_packages == ("bitsandbytes>=0.45",)
    assert AutoGPTQPlugin.required_packages == ("gptqmodel>=7.6", "optimum>=2.0")

    class Uninstalled(BitsAndBytesPlugin):  # the same plugin, needing a package not installed
        required_packages = ("accel-peft-absent-backend>=1.0",)

    info = PluginInfo("bitsandbytes", Uninstalled, "accel-peft", "0.1.0", "")
    with pytest.raises(PluginRequirementError) as err:
        AccelerationFramework(
            sections={"peft.quantization.bitsandbytes": {}}, available={"bitsandbytes": info}
        )
    assert "pip install 'accel-peft-absent-backend>=1.0'" in str(err.value)


def test_commands_name_a_missing_backend_package(monkeypatch):
    from accel_peft import packages

    monkeypatch.setitem(packages.PACKAGES, "gptq", ("accel-peft-absent-backend>=1.0",))
    with pytest.raises(
        PluginRequirementError, match=r"pip install 'accel-peft-absent-backend>=1.0'"
    ):
        packages.require("gptq", "accel quantize")
    packages.require("bitsandbytes", "--bnb_qlora")  # installed here: no error

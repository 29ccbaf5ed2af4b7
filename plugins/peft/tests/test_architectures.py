"""QLoRA on more architectures and GPTQ-LoRA on a second one, through ``accel.train``: the loss
falls and every saved LoRA B matrix moved off its zero start. Mixtral's experts are fused 3-D
tensors that bitsandbytes leaves unquantized, so its LoRA targets the attention projections;
the experts stay frozen in the training dtype."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft_helpers import losses, run_args
from safetensors.torch import load_file

import accel


def _train_and_check(tmp_path, model_dir, name, **extra):
    args = run_args(tmp_path, model_dir, name, **extra)
    result = accel.train(args)
    values = losses(result)
    assert all(map(math.isfinite, values)) and values[-1] < values[0], values
    saved = load_file(str(tmp_path / f"save-{name}" / "adapter_model.safetensors"))
    b_mats = [v for k, v in saved.items() if "lora_B" in k]
    assert b_mats and all(v.abs().max() > 0 for v in b_mats)
    return saved


@pytest.fixture()
def data(assets, tmp_path):
    (tmp_path / "train.jsonl").write_text((assets / "train.jsonl").read_text())
    return tmp_path


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "granite", "gpt_bigcode"])
def test_qlora_architectures(data, model_type):
    from accel.testing import save_tiny_model

    model_dir = save_tiny_model(data / model_type, model_type)
    _train_and_check(data, model_dir, model_type, bnb_qlora=["nf4"], torch_dtype="bfloat16")


def test_qlora_mixtral_attention_only(data):
    from accel.testing import save_tiny_model

    model_dir = save_tiny_model(data / "mixtral", "mixtral")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    saved = _train_and_check(
        data,
        model_dir,
        "mixtral",
        bnb_qlora=["nf4"],
        torch_dtype="bfloat16",
        target_modules=targets,
    )
    assert {k.split(".")[-3] for k in saved} == set(targets)


def test_gptq_lora_qwen2_bf16(data):
    from accel.cli.main import main as cli_main
    from accel.testing import save_tiny_model

    model_dir = save_tiny_model(data / "qwen2", "qwen2", hidden_size=64, intermediate_size=128)
    gptq = data / "qwen2-gptq"
    command = ["quantize", str(model_dir), str(gptq), "--bits", "4", "--group_size", "32"]
    calibration = ["--calibration", str(data / "train.jsonl"), "--max_examples", "16"]
    assert cli_main([*command, *calibration]) == 0  # the command line, end to end
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert not [p for p in data.iterdir() if p.name.startswith(".qwen2-gptq")]  # no staging left
    saved = _train_and_check(
        data, gptq, "qwen2-gptq", auto_gptq=["triton_v2"], torch_dtype="bfloat16"
    )
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}

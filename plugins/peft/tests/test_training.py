"""QLoRA and GPTQ-LoRA through ``accel.train`` end to end: the loss falls, the adapters are
saved in PEFT format with the base's quantization recorded, and ``accel export merged`` writes
a plain checkpoint whose logits are those of the adapters on the dequantized base. Also the
fms-hf-tuning seeds: the JSON form of the GPTQ command (fp16) and both fused-LoRA combinations
with the fast kernels, every setting kept."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft_helpers import batch, losses, run_args

import accel
from accel.cli.main import main as cli_main
from accel.testing import assert_close_scaled
from accel_peft.adapters import load_adapters
from accel_peft.export import BASE_FILE, dequantized_base, merged_model, read_adapter


def _train(args):
    result = accel.train(args)
    try:
        values = losses(result)
        assert len(values) == args["max_steps"] and all(map(math.isfinite, values))
        assert values[-1] < values[0], values
        return result
    finally:
        result.framework.revert_patches()


def _check_export(adapter_dir, out_dir, training_dtype):
    """CLI export in the training dtype, and an fp32 merge compared tightly."""
    from transformers import AutoModelForCausalLM

    assert cli_main(["export", "merged", str(adapter_dir), str(out_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.dtype == training_dtype
    assert all(type(m) is not torch.nn.Module for m in merged.modules())
    base, info = read_adapter(str(adapter_dir))
    reference = load_adapters(dequantized_base(base, info), str(adapter_dir)).eval()
    x = batch(seed=2)
    with torch.no_grad():
        got, want = merged(input_ids=x).logits, reference(input_ids=x).logits
        assert_close_scaled(got, want, 2e-2 if training_dtype != torch.float32 else 1e-5)
        # in fp32 the merge itself is exact to rounding
        exact = merged_model(str(adapter_dir), torch.float32).eval()(input_ids=x).logits
        ref32 = (
            load_adapters(
                dequantized_base(base, info, torch.float32), str(adapter_dir), torch.float32
            )
            .eval()(input_ids=x)
            .logits
        )
    assert_close_scaled(exact, ref32, 1e-5)


def test_qlora_trains_saves_and_exports(assets, tmp_path):
    args = run_args(
        tmp_path,
        assets / "llama",
        "qlora",
        bnb_qlora=["nf4"],
        torch_dtype="bfloat16",
        gradient_checkpointing=True,
    )
    args["training_data_path"] = str(assets / "train.jsonl")
    result = _train(args)
    assert result.framework.names == ["bitsandbytes"]
    saved = tmp_path / "save-qlora"
    assert (saved / "adapter_model.safetensors").is_file()
    info = json.loads((saved / BASE_FILE).read_text())
    assert info.pop("adapter_sha256")
    assert info == {"method": "bitsandbytes", "quant_type": "nf4", "torch_dtype": "bfloat16"}
    assert read_adapter(str(saved))[1]["method"] == "bitsandbytes"
    other = tmp_path / "other-adapters"  # a record beside other adapters is not applied
    shutil.copytree(saved, other)
    data = bytearray((other / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (other / "adapter_model.safetensors").write_bytes(bytes(data))
    assert read_adapter(str(other))[1] == {}
    _check_export(saved, tmp_path / "merged", torch.bfloat16)


def test_gptq_seed_json_form_fp16(gptq_dir, assets, tmp_path):
    """fms-hf-tuning's GPTQ-LoRA JSON, verbatim keys: "auto_gptq": ["triton_v2"],
    "torch_dtype": "float16", "fp16": true (the Trainer runs fp16 autocast on CPU)."""
    args = run_args(tmp_path, gptq_dir, "gptq-fp16")
    args["training_data_path"] = str(assets / "train.jsonl")
    args.update(json.loads('{"auto_gptq": ["triton_v2"], "torch_dtype": "float16", "fp16": true}'))
    result = _train(args)
    plugin = result.framework.get("auto_gptq")
    assert (plugin.config().kernel, plugin.config().from_quantized) == ("triton_v2", True)
    saved = tmp_path / "save-gptq-fp16"
    assert json.loads((saved / BASE_FILE).read_text())["method"] == "auto_gptq"
    _check_export(saved, tmp_path / "merged", torch.float16)


@pytest.mark.parametrize("base", ["auto_gptq", "bitsandbytes"])
def test_fused_lora_and_fast_kernels_keep_every_setting(gptq_dir, assets, tmp_path, base):
    model = gptq_dir if base == "auto_gptq" else assets / "llama"
    quant = ["--auto_gptq", "triton_v2"] if base == "auto_gptq" else ["--bnb_qlora", "nf4"]
    argv = [
        "--model_name_or_path", str(model),
        "--training_data_path", str(assets / "train.jsonl"),
        "--data_formatter_template", "### Input: {{input}}\n### Response: {{output}}",
        "--response_template", "### Response:",
        "--output_dir", str(tmp_path / "out"),
        "--max_seq_length", "48",
        "--per_device_train_batch_size", "8",
        "--max_steps", "4",
        "--learning_rate", "3e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--disable_tqdm", "True",
        "--peft_method", "lora",
        "--target_modules", "all-linear",
        "--lora_dropout", "0.1",
        "--torch_dtype", "bfloat16",
        "--fast_kernels", "True", "True", "True",
        *quant,
        "--fused_lora", base, "True",
    ]  # fmt: skip
    from accel.trainer.run import main_from_argv

    result = main_from_argv(argv)
    try:
        settings = result.framework.get("fused_ops").settings
        assert (settings.fast_loss, settings.fast_rms_layernorm) == (True, True)
        assert (settings.fast_rope_embeddings, settings.base_layer, settings.fused_lora) == (
            True,
            base,
            True,
        )
        assert result.framework.names == [base, "fused_ops"]
        counts = result.framework.patches.counts
        assert counts["fused_ops.lora_linear"] + counts.get("fused_ops.lora_qkv", 0) * 3 >= 12
        assert counts["fused_ops.rms_norm"] == 5 and counts["fused_ops.rotary_embedding"] == 2
        assert counts["fused_ops.linear_cross_entropy_loss"] == 1
        values = losses(result)
        assert all(map(math.isfinite, values)) and values[-1] < values[0]
    finally:
        result.framework.revert_patches()


def test_gptq_seed_command_line_verbatim(gptq_dir, assets, tmp_path, capsys):
    """fms-hf-tuning's GPTQ-LoRA command: `--auto_gptq triton_v2 --torch_dtype float16 --fp16`
    (a bare --fp16), through `accel train`."""
    from peft_helpers import train_argv

    argv = train_argv(assets, gptq_dir, "--auto_gptq", "triton_v2", "--torch_dtype", "float16")
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    extra = ["--fp16", "--max_steps", "3", "--learning_rate", "3e-3", "--logging_steps", "1"]
    assert cli_main([*argv, *extra]) == 0
    out = capsys.readouterr().out
    assert "auto_gptq (accel-peft" in out and "gptqmodel backend torch" in out
    logged = [json.loads(line) for line in (tmp_path / "out" / "training_logs.jsonl").open()]
    values = [r["loss"] for r in logged if "loss" in r]
    assert len(values) == 3 and all(map(math.isfinite, values))

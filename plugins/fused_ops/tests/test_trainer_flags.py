"""End to end through the trainer's command-line parsing: every fused_ops setting survives.

``--fast_kernels`` fills ``training.fused_ops_and_kernels`` and ``--fused_lora`` fills
``peft.quantization.fused_ops_and_kernels``; the plugin merges both paths. The run with a base
layer the model does not have must fail with the base-layer error: that proves the fused_lora
setting reached the patch rules instead of being dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from accel import PatchError
from accel.registry import discover_plugins
from accel.trainer.run import build_framework, main_from_argv, parse_argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with the demo tokenizer, and 32 cipher examples."""
    from accel.testing import save_tiny_model
    from accel.trainer.demo import make_examples

    root = tmp_path_factory.mktemp("fused-ops-run")
    save_tiny_model(root / "model")
    rows = make_examples(32, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(root: Path, base_layer: str) -> list[str]:
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    return [
        "--model_name_or_path", str(root / "model"),
        "--training_data_path", str(root / "train.jsonl"),
        "--data_formatter_template", TEMPLATE,
        "--response_template", RESPONSE_TEMPLATE,
        "--output_dir", str(root / f"out-{base_layer}"),
        "--max_seq_length", "48",
        "--per_device_train_batch_size", "8",
        "--max_steps", "3",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--disable_tqdm", "True",
        "--peft_method", "lora",
        "--fast_kernels", "True", "True", "True",
        "--fused_lora", base_layer, "True",
    ]  # fmt: skip


def _settings(argv: list[str]):
    available = discover_plugins()
    plugin = build_framework(parse_argv(argv, available), available).get("fused_ops")
    return plugin.settings


def test_fast_kernels_and_fused_lora_plain_keep_all_settings_and_train(run_dir):
    argv = _argv(run_dir, "plain")
    settings = _settings(argv)
    assert (settings.fast_loss, settings.fast_rms_layernorm, settings.fast_rope_embeddings) == (
        True,
        True,
        True,
    )
    assert (settings.base_layer, settings.fused_lora) == ("plain", True)

    result = main_from_argv(argv)
    try:
        counts = result.framework.patches.counts
        assert counts == {
            "fused_ops.lora_linear": 4,  # q_proj and v_proj (the default targets), 2 layers
            "fused_ops.rms_norm": 5,
            "fused_ops.rotary_embedding": 2,
            "fused_ops.linear_cross_entropy_loss": 1,
        }
        assert "fused_ops.lora_linear" in result.framework.report()
        assert result.summary["train_steps"] == 3
        assert math.isfinite(result.summary["final_loss"])
    finally:
        result.framework.revert_patches()


def test_fused_lora_auto_gptq_setting_is_kept_next_to_fast_kernels(run_dir):
    argv = _argv(run_dir, "auto_gptq")
    settings = _settings(argv)
    assert settings.fast_loss is True and settings.fast_rope_embeddings is True
    assert (settings.base_layer, settings.fused_lora) == ("auto_gptq", True)
    # the model's LoRA layers sit on plain nn.Linear: the rules see base_layer and refuse
    with pytest.raises(PatchError, match=r"base_layer is 'auto_gptq'.*found 4 on plain"):
        main_from_argv(argv)

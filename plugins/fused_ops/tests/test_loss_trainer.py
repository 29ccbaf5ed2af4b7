"""The fused loss's options through the trainer: label smoothing and the logged metrics.

``--label_smoothing_factor`` with the fused linear loss used to be refused (transformers'
Trainer smooths the model's logits itself, which the fused loss never returns). Now the factor
moves into the fused loss: the run must log the same losses as the unfused run, where the
Trainer's own label smoother computes them (rtol 1e-4: two training steps of a tiny Llama
whose gradients agree to fp32 round-off). ``token_accuracy`` and ``z_loss`` must reach the
JSONL training log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accel.trainer.run import main_from_argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with the demo tokenizer, and 16 cipher examples."""
    from accel.testing import save_tiny_model
    from accel.trainer.demo import make_examples

    root = tmp_path_factory.mktemp("fused-loss-run")
    save_tiny_model(root / "model")
    rows = make_examples(16, seed=5)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(root: Path, name: str, *extra: str) -> list[str]:
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    return [
        "--model_name_or_path", str(root / "model"),
        "--training_data_path", str(root / "train.jsonl"),
        "--data_formatter_template", TEMPLATE,
        "--response_template", RESPONSE_TEMPLATE,
        "--output_dir", str(root / name),
        "--max_seq_length", "48",
        "--per_device_train_batch_size", "8",
        "--max_steps", "2",
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--disable_tqdm", "True",
        "--seed", "7",
        "--peft_method", "lora",
        *extra,
    ]  # fmt: skip


def _logged(root: Path, name: str) -> list[dict]:
    lines = (root / name / "training_logs.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_label_smoothing_factor_works_with_the_fused_loss(run_dir):
    smoothing = ("--label_smoothing_factor", "0.1")
    fused = main_from_argv(
        _argv(run_dir, "fused", *smoothing, "--fast_kernels", "True", "False", "False")
    )
    try:
        assert fused.framework.patches.counts == {"fused_ops.linear_cross_entropy_loss": 1}
        plugin = fused.framework.get("fused_ops")
        assert plugin.settings.label_smoothing == 0.1
    finally:
        fused.framework.revert_patches()
    plain = main_from_argv(_argv(run_dir, "plain", *smoothing))
    ours, theirs = _logged(run_dir, "fused"), _logged(run_dir, "plain")
    assert [r["step"] for r in ours] == [1, 2] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert plain.summary["train_steps"] == 2


def test_token_accuracy_and_z_loss_are_logged(run_dir):
    config = run_dir / "loss.yaml"
    config.write_text(
        "plugins:\n  training:\n    fused_ops_and_kernels:\n      fast_loss: true\n"
        "      token_accuracy: true\n      z_loss: 0.001\n"
    )
    result = main_from_argv(_argv(run_dir, "metrics", "--acceleration_config", str(config)))
    result.framework.revert_patches()
    logged = _logged(run_dir, "metrics")
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        assert 0.0 <= record["token_accuracy"] <= 1.0
        # lse of a 2-layer model's logits over its vocabulary is ~log(V) > 1: z-loss > 1e-3
        assert record["z_loss"] > 1e-3
    history = [h for h in result.log_history if "loss" in h]
    assert [h["token_accuracy"] for h in history] == [r["token_accuracy"] for r in logged]

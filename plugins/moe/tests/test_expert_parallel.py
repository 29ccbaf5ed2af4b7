"""``--fast_moe 2`` under torchrun (2 gloo processes, transformers' EP with FSDP 2) against one
process at the same global batch: same losses and Trainer grad norms, same trained weights
(gathered from the shards), experts really split, the final model a plain HF checkpoint that
loads in one process with the single run's logits; load_best_model_at_end refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import WORKER, failure, records, torchrun, write_args
from dist_worker import recording_train

PORT = 29821


@pytest.fixture(scope="module")
def ep_runs(moe_run_dir, tmp_path_factory):
    from moe_models import save_moe_model

    import accel
    from accel.testing import cipher_run_args
    from accel.trainer.trainer import AccelTrainer

    root = tmp_path_factory.mktemp("ep")
    # Without the router's auxiliary loss: it is computed per process over the process's own
    # tokens (a nonlinear function of the routing fractions), so a data-parallel run's loss
    # differs from one process's by up to the aux coefficient (0.001 x ~2) in every engine.
    save_moe_model(root / "model", "mixtral", output_router_logits=False)
    base = cipher_run_args(root / "model", moe_run_dir / "train.jsonl", learning_rate=1e-2)
    ep = {**base, "per_device_train_batch_size": 4, "fast_moe": 2}
    ep["output_dir"], ep["save_model_dir"] = str(root / "ep-out"), str(root / "ep-model")
    done = torchrun(PORT, str(WORKER), write_args(root / "ep.json", ep), str(root / "ep"))
    assert done.returncode == 0, failure(done)

    mp = pytest.MonkeyPatch()
    mp.setattr(AccelTrainer, "train", recording_train(root / "one"))
    (root / "one").mkdir()
    try:
        accel.train(
            {**base, "per_device_train_batch_size": 8, "fast_moe": True,
             "output_dir": str(root / "one-out"), "save_model_dir": str(root / "one-model")}
        )  # fmt: skip
    finally:
        mp.undo()
    return {"root": root, "ranks": records(root / "ep"), "one": records(root / "one", 1)[0],
            "base": base, "stdout": done.stdout}  # fmt: skip


def _history(record, key):
    return [h[key] for h in record["log_history"] if key in h]


def test_ep2_matches_one_process(ep_runs):
    ranks, one = ep_runs["ranks"], ep_runs["one"]
    assert "expert parallel over 2 processes" in ep_runs["stdout"]
    # the Trainer clips at max_grad_norm 1.0: equal weights after clipped steps mean every
    # process clipped by the true global norm over dense, FSDP-sharded and EP-sharded grads
    assert max(_history(one, "grad_norm")) > 1.0
    for rank in ranks:
        # the experts were split: each rank stores half of every expert tensor
        experts = [n for n in rank["params"] if "experts." in n]
        assert experts
        for name in experts:
            assert rank["local_numel"][name] * 2 == one["params"][name].numel(), name
        assert _history(rank, "loss") == pytest.approx(_history(one, "loss"), rel=1e-5)
        assert _history(rank, "grad_norm") == pytest.approx(_history(one, "grad_norm"), rel=1e-4)
        for name, value in one["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ep2_final_model_is_plain_hf(ep_runs):
    from transformers import AutoModelForCausalLM

    root: Path = ep_runs["root"]
    ep_model = AutoModelForCausalLM.from_pretrained(root / "ep-model").eval()
    one_model = AutoModelForCausalLM.from_pretrained(root / "one-model").eval()
    ids = torch.randint(4, 60, (2, 11))
    with torch.no_grad():
        got, want = ep_model(input_ids=ids).logits, one_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert ep_model.config.num_local_experts == 4  # every expert, not one rank's half


def test_ep_load_best_model_at_end_refused_before_training(ep_runs, tmp_path):
    """Checkpoints of a model sharded at load time are sharded state (resumable, see
    test_resume.py) that load_best_model_at_end cannot reload: the run stops with one line."""
    data = ep_runs["base"]["training_data_path"]
    args = {**ep_runs["base"], "per_device_train_batch_size": 4, "fast_moe": 2,
            "save_strategy": "steps", "save_steps": 2, "eval_strategy": "steps", "eval_steps": 2,
            "load_best_model_at_end": True, "validation_data_path": data,
            "output_dir": str(tmp_path / "o")}  # fmt: skip
    done = torchrun(PORT + 1, "-m", "accel.cli", "train", write_args(tmp_path / "a.json", args))
    assert done.returncode != 0
    assert "--fast_moe 2: load_best_model_at_end cannot reload" in done.stderr, done.stderr[-3000:]
    # a rank exits with status 2 and the one line (torchrun may stop the other first); the
    # only traceback is torchrun's own
    assert "exitcode  : 2" in done.stderr
    assert "ConfigError" not in done.stderr and "accel_moe" not in done.stderr


def test_ep2_lora_on_attention_with_padding_free_matches_one_process(ep_runs, tmp_path):
    """Attention LoRA and padding-free batches under EP 2: the same losses and adapter weights
    as one process, and the saved adapter gives the single run's logits on the plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import accel
    from accel.trainer.trainer import AccelTrainer

    lora = {"peft_method": "lora", "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
            "padding_free": ["huggingface"], "max_steps": 3}  # fmt: skip
    ep = {**ep_runs["base"], **lora, "per_device_train_batch_size": 4, "fast_moe": 2,
          "output_dir": str(tmp_path / "ep-out"), "save_model_dir": str(tmp_path / "ep-adapter")}  # fmt: skip
    done = torchrun(
        PORT + 2, str(WORKER), write_args(tmp_path / "ep.json", ep), str(tmp_path / "ep")
    )
    assert done.returncode == 0, failure(done)
    mp = pytest.MonkeyPatch()
    mp.setattr(AccelTrainer, "train", recording_train(tmp_path / "one"))
    (tmp_path / "one").mkdir()
    try:
        accel.train(
            {**ep_runs["base"], **lora, "per_device_train_batch_size": 8, "fast_moe": True,
             "output_dir": str(tmp_path / "one-out"), "save_model_dir": str(tmp_path / "one-adapter")}
        )  # fmt: skip
    finally:
        mp.undo()
    one = records(tmp_path / "one", 1)[0]
    for rank in records(tmp_path / "ep"):
        assert _history(rank, "loss") == pytest.approx(_history(one, "loss"), rel=1e-5)
        assert _history(rank, "grad_norm") == pytest.approx(_history(one, "grad_norm"), rel=1e-4)
        trained = [n for n in one["params"] if "lora_" in n]
        assert trained
        for name in trained:
            torch.testing.assert_close(
                rank["params"][name], one["params"][name], rtol=1e-4, atol=1e-6
            )

    ids = torch.randint(4, 60, (2, 11))
    logits = []
    for adapter in ("ep-adapter", "one-adapter"):
        base = AutoModelForCausalLM.from_pretrained(ep_runs["base"]["model_name_or_path"])
        model = PeftModel.from_pretrained(base, str(tmp_path / adapter)).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


def test_fast_moe_true_with_fsdp_size_shards_experts_like_the_rest(ep_runs, tmp_path):
    """``--fast_moe True --fsdp_size 2``: ScatterMoE over FSDP2-sharded experts (DTensors, half
    per process) trains like one process."""
    args = {**ep_runs["base"], "per_device_train_batch_size": 4, "fast_moe": True,
            "fsdp_size": 2, "output_dir": str(tmp_path / "o")}  # fmt: skip
    done = torchrun(
        PORT + 3, str(WORKER), write_args(tmp_path / "a.json", args), str(tmp_path / "r")
    )
    assert done.returncode == 0, failure(done)
    one = ep_runs["one"]
    for rank in records(tmp_path / "r"):
        name = "model.layers.0.mlp.experts.gate_up_proj"
        assert rank["param_types"][name] == "DTensor"
        assert rank["local_numel"][name] * 2 == one["params"][name].numel()
        assert _history(rank, "loss") == pytest.approx(_history(one, "loss"), rel=1e-5)
        for name, value in one["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)

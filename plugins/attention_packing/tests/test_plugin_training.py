"""The plugins through the real trainer: padded vs padding-free runs, multipack under DDP,
and the configuration errors users hit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_fixtures import identifiable_examples, write_jsonl

import accel
from accel import ConfigError, PluginRequirementError
from accel.testing import save_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_tiny_model(root / arch, arch) for arch in ("llama", "mixtral", "gpt_bigcode")
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(identifiable_examples(120), tmp_path_factory.mktemp("data") / "train.jsonl")


def args_for(model_dir: Path, data: Path, out: Path, **extra) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "training_data_path": str(data),
        "output_dir": str(out),
        "per_device_train_batch_size": 6,
        "max_steps": 8,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 3,
        **extra,
    }


def losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt_bigcode"])
def test_padding_free_training_matches_padded(models, data, tmp_path, arch):
    """Same examples, same order: padded and padding-free runs follow the same loss curve
    (fp32; the tolerance covers summation-order differences over 8 optimizer steps)."""
    padded = accel.train(args_for(models[arch], data, tmp_path / "padded"))
    packed = accel.train(
        args_for(models[arch], data, tmp_path / "packed", padding_free=["huggingface"])
    )
    assert losses(padded) == pytest.approx(losses(packed), rel=1e-4)
    assert (
        packed.summary["train_tokens"]
        == packed.summary["train_tokens_per_s"] * 0 + packed.summary["train_tokens"]
    )
    assert packed.summary["train_tokens"] < padded.summary["train_tokens"]  # no pad tokens fed
    fw = packed.framework
    assert fw.names == ["padding_free"]
    assert "accel_varlen_sdpa" in fw.report()


def test_padding_free_turns_kv_cache_off(models, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from accel import AccelerationFramework
    from accel.trainer.arguments import TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    model.config.use_cache = True
    fw = AccelerationFramework({"plugins": {"training": {"attention": {"padding_free": {}}}}})
    model, _ = fw.augment_model(model, TrainingArguments(output_dir=str(tmp_path)), None)
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "accel_varlen_sdpa"


def test_multipack_without_padding_free_is_an_error(models, data, tmp_path):
    with pytest.raises(
        PluginRequirementError, match="'multipack' requires plugin 'padding_free'.*--padding_free"
    ):
        accel.train(args_for(models["llama"], data, tmp_path, multipack=[1]))


def test_multipack_rejects_iterable_dataset(tmp_path):
    import datasets

    from accel import AccelerationFramework
    from accel.trainer.arguments import TrainingArguments

    fw = AccelerationFramework(
        {
            "plugins": {
                "training": {
                    "attention": {"padding_free": {}},
                    "dataloader": {"multipack": {"num_processes": 1}},
                }
            }
        }
    )
    stream = datasets.Dataset.from_list([{"input_ids": [1, 2]}]).to_iterable_dataset()
    with pytest.raises(ConfigError, match="needs the length of every example up front"):
        fw.train_dataloader(stream, None, TrainingArguments(output_dir=str(tmp_path)))


def test_multipack_bad_config_value(models, data, tmp_path):
    with pytest.raises(ConfigError, match="num_processes must be >= 1"):
        accel.train(
            args_for(models["llama"], data, tmp_path, padding_free=["huggingface"], multipack=[0])
        )


def _run_worker(args: dict, tmp_path: Path, name: str, port: int | None) -> Path:
    """ddp_trainer_worker.py under torchrun (2 ranks, port given) or as the single-process
    reference (port None); returns the folder it recorded into."""
    record = tmp_path / name
    record.mkdir()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(args))
    worker = Path(__file__).parent / "ddp_trainer_worker.py"
    env = {**os.environ, "RECORD_DIR": str(record), "OMP_NUM_THREADS": "1"}
    if port is None:
        env["UNION_OF_RANKS"] = "2"
        cmd = [sys.executable, str(worker), str(path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(port), str(worker), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return record


def test_multipack_ddp_every_example_once_per_epoch(models, data, tmp_path):
    """2 processes (torchrun, gloo, no distributed flag) through accel.train with padding-free
    + multipack: each epoch the ranks together see every example exactly once, both ranks end
    with identical weights, and those equal one process trained on the union of the two ranks'
    bins at every step (fp32, max abs diff <= 1e-5), with the same logged losses."""
    import torch

    args = args_for(
        models["llama"],
        data,
        tmp_path / "out",
        padding_free=["huggingface"],
        multipack=[1],
        num_train_epochs=2,
    )
    args.pop("max_steps")
    record = _run_worker(args, tmp_path, "ddp", port=29630)
    per_rank = [
        [json.loads(x) for x in (record / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    steps = len(per_rank[0])
    assert steps == len(per_rank[1]) and steps % 2 == 0  # same number of steps on both ranks
    half = steps // 2
    for epoch in range(2):
        seen = [
            i
            for rank in per_rank
            for batch in rank[epoch * half : (epoch + 1) * half]
            for i in batch
        ]
        assert sorted(seen) == list(range(120)), f"epoch {epoch}"
    first_epoch_rank0 = [i for b in per_rank[0][:half] for i in b]
    second_epoch_rank0 = [i for b in per_rank[0][half:] for i in b]
    assert first_epoch_rank0 != second_epoch_rank0  # a new plan each epoch

    rank0, rank1 = (torch.load(record / f"rank{r}.pt", weights_only=False) for r in range(2))
    for name, p in rank0["params"].items():  # DDP: bitwise identical on both ranks
        torch.testing.assert_close(p, rank1["params"][name], rtol=0, atol=0)

    single_args = {**args, "per_device_train_batch_size": 2 * args["per_device_train_batch_size"]}
    single_args["output_dir"] = str(tmp_path / "single_out")
    ref_record = _run_worker(single_args, tmp_path, "single", port=None)
    reference = torch.load(ref_record / "rank0.pt", weights_only=False)
    union = [json.loads(x) for x in (ref_record / "rank0.jsonl").read_text().splitlines()]
    assert union == [a + b for a, b in zip(per_rank[0], per_rank[1], strict=True)]
    diff = max(float((p - reference["params"][n]).abs().max()) for n, p in rank0["params"].items())
    assert diff <= 1e-5, diff
    ddp_losses = [h["loss"] for h in rank0["log_history"] if "loss" in h]
    assert ddp_losses == pytest.approx(
        [h["loss"] for h in reference["log_history"] if "loss" in h], rel=1e-5
    )


def test_padding_free_with_template_response_masking_and_grad_accumulation(models, tmp_path):
    """Untokenized records rendered by data_formatter_template, loss only after the response
    template, max_seq_length truncation and gradient accumulation: padded and padding-free
    runs still agree step by step."""
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE, make_examples

    data = write_jsonl(make_examples(48, seed=5), tmp_path / "cipher.jsonl")
    extra = {
        "data_formatter_template": TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
        "max_seq_length": 20,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
    }
    padded = accel.train(args_for(models["llama"], data, tmp_path / "padded", **extra))
    packed = accel.train(
        args_for(models["llama"], data, tmp_path / "packed", **extra, padding_free=["huggingface"])
    )
    assert losses(padded) == pytest.approx(losses(packed), rel=1e-4)
    assert len(losses(packed)) == 4


def test_multipack_resume_mid_epoch_neither_repeats_nor_skips(models, data, tmp_path, monkeypatch):
    """Train one epoch with a checkpoint at step 4, then resume a new run from it: the steps
    before the checkpoint plus the resumed steps see every example exactly once."""
    from trainer_fixtures import identity

    from accel_attention_packing import collator as collator_module

    seen: list[list[int]] = []
    original = collator_module.PaddingFreeCollator.__call__

    def recording(self, features):
        seen.append([identity(list(f["input_ids"])) for f in features])
        return original(self, features)

    monkeypatch.setattr(collator_module.PaddingFreeCollator, "__call__", recording)
    args = args_for(
        models["llama"],
        data,
        tmp_path / "out",
        padding_free=["huggingface"],
        multipack=[1],
        num_train_epochs=1,
        save_strategy="steps",
        save_steps=4,
    )
    args.pop("max_steps")
    full = accel.train({**args, "resume_from_checkpoint": "False"})
    steps = full.summary["train_steps"]
    assert steps > 4 and sorted(i for b in seen for i in b) == list(range(120))
    before_checkpoint = seen[:4]
    seen.clear()
    resumed = accel.train(
        {**args, "resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-4")}
    )
    assert resumed.summary["train_steps"] == steps
    assert len(seen) == steps - 4
    assert sorted(i for b in before_checkpoint + seen for i in b) == list(range(120))


def test_unsupported_architecture_is_named(tmp_path):
    """gemma2 is not among the verified architectures: the run stops before loading weights."""
    model_dir = save_tiny_model(tmp_path / "gemma2", "gemma2")
    data = write_jsonl(identifiable_examples(8), tmp_path / "d.jsonl")
    with pytest.raises(
        accel.UnsupportedModelError, match="'padding_free' does not support model_type 'gemma2'"
    ) as err:
        accel.train(args_for(model_dir, data, tmp_path / "out", padding_free=["huggingface"]))
    # the support table's reason travels into the refusal
    assert "no sdpa support in this version" in str(err.value)

"""FSDP2 through both existing engines, 2 gloo processes on CPU.

1. accelerate's FSDP, launched as fms-hf-tuning users launch it on GPUs:
   ``accelerate launch --config_file tests/data/fsdp2.yaml`` (FSDP v2, TRANSFORMER_BASED_WRAP,
   reshard after forward = FULL_SHARD, SHARDED_STATE_DICT). accelerate enables FSDP only for
   GPU-like distributed types, so on CPU it would stay MULTI_CPU (DDP). The worker's
   ``--force-fsdp`` forces exactly one thing: after accelerate builds its state, the distributed
   type MULTI_CPU is switched to FSDP with the plugin accelerate made from the config. The
   wrapping (``fully_shard``), the sharded checkpoints, the final full save and the resume are
   accelerate's and transformers' own code.
2. transformers' FSDP2 at load time: ``fsdp_size 2`` -> ``from_pretrained(distributed_config=
   DistributedConfig(fsdp_size=2))`` under plain torchrun; nothing is forced.

The reference is one process at the same global batch (2 ranks x 4 = 8), which DDP reproduces
(tests/test_distributed.py): same examples per step, fp32, no dropout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import (
    FSDP2_CONFIG,
    WORKER,
    accelerate_launch,
    failure,
    losses,
    max_diff,
    records,
    saved_weights,
    torchrun,
    write_args,
)
from dist_worker import recording_train

import accel
from accel.trainer.trainer import AccelTrainer

PER_RANK = 4
LORA = {"peft_method": "lora", "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def run_args(tiny_model_dir: Path, train_jsonl: Path) -> dict:
    from accel.testing import cipher_run_args

    return cipher_run_args(tiny_model_dir, train_jsonl, learning_rate=1e-2)


def single_process(args: dict, root: Path) -> dict:
    """Train in this process at per-device batch 8; return what dist_worker records."""
    mp = pytest.MonkeyPatch()
    mp.setattr(AccelTrainer, "train", recording_train(root))
    try:
        accel.train(
            {
                **args,
                "per_device_train_batch_size": 2 * PER_RANK,
                "output_dir": str(root / "out"),
                "save_model_dir": str(root / "model"),
            }
        )
    finally:
        mp.undo()
    return {**records(root, 1)[0], "model": root / "model"}


@pytest.fixture(scope="module")
def full_reference(run_args, tmp_path_factory):
    return single_process(run_args, tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def lora_reference(run_args, tmp_path_factory):
    return single_process({**run_args, **LORA}, tmp_path_factory.mktemp("lora"))


def accelerate_fsdp(port: int, args: dict, tmp: Path, name: str) -> list[dict]:
    out = tmp / name
    done = accelerate_launch(
        port,
        str(WORKER),
        write_args(tmp / f"{name}.json", args),
        str(out / "rec"),
        "--force-fsdp",
        options=("--config_file", str(FSDP2_CONFIG)),
    )
    assert done.returncode == 0, failure(done)
    return records(out / "rec")


def assert_sharded_like(ranks: list[dict], reference: dict, kind: str) -> None:
    rank0, rank1 = ranks
    assert rank0["distributed_type"] == kind
    base = [n for n in rank0["params"] if "lora_" not in n]
    for rank in ranks:  # every base weight is a DTensor
        assert {rank["param_types"][n] for n in base} == {"DTensor"}
    for n in base:  # ... split between the two ranks (Shard(0): the 2 pieces make up the whole)
        assert rank0["local_numel"][n] + rank1["local_numel"][n] == rank0["params"][n].numel()
    stored = sum(rank0["local_numel"][n] for n in base)
    assert stored <= 0.55 * sum(rank0["params"][n].numel() for n in base)
    assert max_diff(rank0["params"], rank1["params"]) == 0.0
    ref = {k: v for k, v in reference["params"].items() if k in rank0["params"]}
    assert ref.keys() == rank0["params"].keys()
    assert max_diff(rank0["params"], ref) <= 1e-5
    assert losses(rank0["log_history"]) == pytest.approx(losses(reference["log_history"]), rel=1e-6)


def test_accelerate_fsdp2_full_finetune_save_and_resume(run_args, full_reference, tmp_path):
    """Sharded checkpoints at steps 2 and 4 and a full model at the end; a second run resumed
    from checkpoint-2 ends with the same weights and losses as the uninterrupted one."""
    args = {
        **run_args,
        "per_device_train_batch_size": PER_RANK,
        "output_dir": str(tmp_path / "full" / "out"),
        "save_model_dir": str(tmp_path / "full" / "model"),
        "save_strategy": "steps",
        "save_steps": 2,
    }
    full = accelerate_fsdp(29620, args, tmp_path, "full")
    assert_sharded_like(full, full_reference, "DistributedType.FSDP")
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # SHARDED_STATE_DICT
    assert (checkpoint / "optimizer_0").is_dir()
    # the final model is a full HF model equal to the single-process one
    model_dir = tmp_path / "full" / "model"
    assert (model_dir / "config.json").is_file()
    assert max_diff(saved_weights(model_dir), saved_weights(full_reference["model"])) <= 1e-5

    resumed_args = {
        **args,
        "output_dir": str(tmp_path / "resumed" / "out"),
        "save_model_dir": str(tmp_path / "resumed" / "model"),
        "save_strategy": "no",
        "resume_from_checkpoint": str(checkpoint),
    }
    resumed = accelerate_fsdp(29621, resumed_args, tmp_path, "resumed")
    assert resumed[0]["distributed_type"] == "DistributedType.FSDP"
    assert max_diff(resumed[0]["params"], full[0]["params"]) == 0.0
    trajectory = [(h["step"], h["loss"]) for h in resumed[0]["log_history"] if "loss" in h]
    assert trajectory == [(h["step"], h["loss"]) for h in full[0]["log_history"] if "loss" in h]
    assert [s for s, _ in trajectory] == [1, 2, 3, 4]


def test_accelerate_fsdp2_lora(run_args, lora_reference, tmp_path):
    args = {
        **run_args,
        **LORA,
        "per_device_train_batch_size": PER_RANK,
        "output_dir": str(tmp_path / "out"),
        "save_model_dir": str(tmp_path / "model"),
    }
    ranks = accelerate_fsdp(29622, args, tmp_path, "lora")
    assert_sharded_like(ranks, lora_reference, "DistributedType.FSDP")
    assert {t for n, t in ranks[0]["param_types"].items() if "lora_" in n} == {"DTensor"}
    diff = max_diff(saved_weights(tmp_path / "model"), saved_weights(lora_reference["model"]))
    assert diff <= 1e-5


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_transformers_fsdp2_at_load_time(run_args, full_reference, lora_reference, tmp_path, lora):
    """fsdp_size 2 under plain torchrun: transformers shards the model as it loads it."""
    reference = lora_reference if lora else full_reference
    args = {
        **run_args,
        **(LORA if lora else {}),
        "fsdp_size": 2,
        "per_device_train_batch_size": PER_RANK,
        "output_dir": str(tmp_path / "out"),
        "save_model_dir": str(tmp_path / "model"),
    }
    port = 29624 if lora else 29623
    done = torchrun(port, str(WORKER), write_args(tmp_path / "a.json", args), str(tmp_path / "r"))
    assert done.returncode == 0, failure(done)
    assert "fsdp2 (transformers, sharded at load time)" in done.stdout
    ranks = records(tmp_path / "r")
    assert_sharded_like(ranks, reference, "DistributedType.MULTI_CPU")
    diff = max_diff(saved_weights(tmp_path / "model"), saved_weights(reference["model"]))
    assert diff <= 1e-5


def test_accelerate_fsdp_config_on_cpu_is_an_error_not_ddp(run_args, tmp_path):
    """The same config file without forcing anything: accelerate would run DDP; accel stops."""
    args = {**run_args, "per_device_train_batch_size": PER_RANK, "output_dir": str(tmp_path)}
    done = accelerate_launch(
        29625,
        "-m",
        "accel.cli",
        "train",
        write_args(tmp_path / "a.json", args),
        options=("--config_file", str(FSDP2_CONFIG)),
    )
    assert done.returncode != 0
    assert (
        "accel: error: FSDP was requested (an accelerate FSDP config (ACCELERATE_USE_FSDP=true)) "
        "but accelerate set up MULTI_CPU" in done.stderr
    )
    assert not (tmp_path / "training_logs.jsonl").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "fsdp_size 2 needs a multi-process launch"),
        (
            {
                "world": "2",
                "save_strategy": "steps",
                "eval_strategy": "steps",
                "load_best_model_at_end": True,
            },
            "load_best_model_at_end cannot reload",
        ),
        ({"world": "2", "fsdp": "full_shard"}, "both shard the model; choose one"),
        ({"world": "3"}, "fsdp_size 2 needs a multi-process launch .*this launch has 3"),
    ],
    ids=["one-process", "best-model", "two-engines", "indivisible"],
)
def test_fsdp_size_refusals_before_loading(run_args, tmp_path, monkeypatch, extra, message):
    """Checked by check_launch, before anything loads. The arguments are parsed in this single
    process; WORLD_SIZE is then set as a launcher would set it."""
    from accel.trainer import distributed
    from accel.trainer.parsing import parse_mapping

    extra = dict(extra)
    world = extra.pop("world", None)
    config = parse_mapping({**run_args, "output_dir": str(tmp_path), "fsdp_size": 2, **extra})
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(accel.ConfigError, match=message):
        distributed.check_launch(config)

"""Real 2-process DDP on CPU (gloo), launched as users launch it: the README's torchrun command
and ``accelerate launch --multi_gpu``, with no distributed flag in the arguments.

The reference is one process at the same global batch: per_device_train_batch_size 4 on two
ranks vs 8 on one process. The Trainer's sampler is a seeded RandomSampler in both cases and
accelerate gives rank r the r-th half of each global batch, so every step sees the same 8
examples. fp32, no dropout: after training the weights agree to 1e-5 (summation order only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_helpers import (
    WORKER,
    accelerate_launch,
    failure,
    jsonl_losses,
    losses,
    max_diff,
    records,
    saved_weights,
    summary_of,
    torchrun,
    write_args,
)
from dist_worker import recording_train

import accel
from accel.trainer.trainer import AccelTrainer

STEPS = 3
PER_RANK = 4


@pytest.fixture(scope="module")
def run_args(tiny_model_dir: Path, train_jsonl: Path) -> dict:
    from accel.testing import cipher_run_args

    return cipher_run_args(tiny_model_dir, train_jsonl, max_steps=STEPS)


@pytest.fixture(scope="module")
def reference(run_args, tmp_path_factory):
    """One process, per-device batch 8: what the 2 x 4 runs must reproduce."""
    root = tmp_path_factory.mktemp("single")
    mp = pytest.MonkeyPatch()
    mp.setattr(AccelTrainer, "train", recording_train(root))
    try:
        result = accel.train(
            {
                **run_args,
                "per_device_train_batch_size": 2 * PER_RANK,
                "output_dir": str(root / "out"),
                "save_model_dir": str(root / "model"),
            }
        )
    finally:
        mp.undo()
    return {"result": result, "record": records(root, 1)[0], "model": root / "model"}


def test_readme_torchrun_command_is_one_ddp_run(run_args, reference, tmp_path):
    """`torchrun --nproc_per_node 2 -m accel.cli train run.json`, exactly as the README says."""
    out = tmp_path / "out"
    args = {
        **run_args,
        "per_device_train_batch_size": PER_RANK,
        "output_dir": str(out),
        "save_model_dir": str(tmp_path / "model"),
    }
    done = torchrun(29610, "-m", "accel.cli", "train", write_args(tmp_path / "run.json", args))
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("accel training summary") == 1  # rank 0 only
    summary = summary_of(done.stdout)
    assert summary["processes"] == "2"
    assert summary["distributed"] == "ddp (gloo)"
    assert summary["train_steps"] == str(STEPS)

    # one log line per step (not per rank), holding the loss of the whole global batch
    logged = jsonl_losses(out / "training_logs.jsonl")
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert [loss for _, loss in logged] == pytest.approx(
        losses(reference["result"].log_history), rel=1e-6
    )
    assert float(summary["final_loss"]) == pytest.approx(logged[-1][1], abs=1e-3)  # rounded

    # rank 0 alone wrote the final model; it is the single-process model
    diff = max_diff(saved_weights(tmp_path / "model"), saved_weights(reference["model"]))
    assert diff <= 1e-5, diff
    assert not list(tmp_path.glob(".model.*"))  # no staging folder left behind


def test_accelerate_launch_multi_gpu_on_cpu_keeps_ranks_in_sync(run_args, reference, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: both ranks
    hold identical weights after training, equal to one process at the same global batch, and
    the token counts are global."""
    args = {**run_args, "per_device_train_batch_size": PER_RANK, "output_dir": str(tmp_path)}
    done = accelerate_launch(
        29611,
        str(WORKER),
        write_args(tmp_path / "run.json", args),
        str(tmp_path / "rec"),
        options=("--multi_gpu", "--num_processes", "2"),
    )
    assert done.returncode == 0, failure(done)
    rank0, rank1 = records(tmp_path / "rec")
    assert rank0["distributed_type"] == "DistributedType.MULTI_CPU"
    assert max_diff(rank0["params"], rank1["params"]) == 0.0  # DDP: bitwise identical
    diff = max_diff(rank0["params"], reference["record"]["params"])
    assert diff <= 1e-5, diff
    assert losses(rank0["log_history"]) == pytest.approx(
        losses(reference["record"]["log_history"]), rel=1e-6
    )
    # non-padding tokens over both ranks = those of the single process (padding differs)
    assert rank0["tokens"][1] == reference["record"]["tokens"][1]
    assert rank0["tokens"] == rank1["tokens"]


def test_fsdp_flag_under_torchrun_on_cpu_stops_before_training(run_args, tmp_path):
    """transformers' --fsdp cannot engage on CPU (accelerate enables FSDP only for GPU-like
    devices): one clear error before training, never a silent DDP run."""
    args = {
        **run_args,
        "per_device_train_batch_size": PER_RANK,
        "output_dir": str(tmp_path / "out"),
        "fsdp": "full_shard auto_wrap",
    }
    done = torchrun(29612, "-m", "accel.cli", "train", write_args(tmp_path / "run.json", args))
    assert done.returncode != 0
    assert "accel: error: FSDP was requested (--fsdp) but accelerate set up MULTI_CPU" in (
        done.stderr
    )
    assert "--fsdp_size" in done.stderr  # names the route that works on CPU
    assert done.stderr.count("accel: error:") == 1  # printed by local rank 0 only
    assert "Traceback" not in done.stderr.split("accel: error:")[0]
    assert not (tmp_path / "out" / "training_logs.jsonl").exists()  # no step was taken


def test_fsdp_in_a_single_process_is_refused_up_front(run_args, tmp_path):
    with pytest.raises(accel.ConfigError, match="FSDP was requested .* single process"):
        accel.train({**run_args, "output_dir": str(tmp_path), "fsdp": "full_shard auto_wrap"})

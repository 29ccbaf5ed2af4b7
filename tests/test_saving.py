"""The final model goes into save_model_dir without losing anything else there."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import accel
from accel.errors import ConfigError
from accel.trainer.saving import MANIFEST, MARKER, STAGING


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _loss_steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if '"loss"' in x]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_save_model_dir_equal_to_output_dir_keeps_checkpoints_and_logs(base_args):
    out = Path(base_args["output_dir"])
    args = {**base_args, "save_strategy": "steps", "save_steps": 2, "save_model_dir": str(out)}
    result = accel.train(args)
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
        assert (out / f"checkpoint-{step}" / "optimizer.pt").is_file()
    assert _loss_steps(out / "training_logs.jsonl") == [1, 2, 3, 4]
    assert Path(result.summary["logs"]).is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert "model.safetensors" in manifest and not any("checkpoint" in f for f in manifest)
    assert not (out / STAGING).exists()

    # resume to 6 steps and save again over the previous final model: everything else stays
    result = accel.train({**args, "max_steps": 6})
    assert result.summary["train_steps"] == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert _loss_steps(out / "training_logs.jsonl") == [1, 2, 3, 4, 5, 6]
    final, last = _weights(out), _weights(out / "checkpoint-6")
    assert final.keys() == last.keys()
    assert all((final[k] == last[k]).all() for k in final)  # the new model, not the old one


def test_users_files_stay_and_only_the_previous_models_files_go(base_args, tmp_path):
    target = tmp_path / "final"
    (target / "data").mkdir(parents=True)
    (target / "notes.txt").write_text("my notes")
    (target / "data" / "eval.jsonl").write_text('{"x": 1}\n')
    (target / "config.yaml").write_text("mine: true\n")
    # a previous model saved there by another tool (no manifest): two shards and their index,
    # plus an adapter_config.json that would make the folder load as an adapter
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
    ):
        (target / name).write_text("{}")
    result = accel.train({**base_args, "save_model_dir": str(target), "max_steps": 2})
    assert result.model_dir == str(target.resolve())
    assert (target / "notes.txt").read_text() == "my notes"
    assert (target / "data" / "eval.jsonl").read_text() == '{"x": 1}\n'
    assert (target / "config.yaml").read_text() == "mine: true\n"
    assert not list(target.glob("model-0000*")) and not (target / "adapter_config.json").exists()
    assert not (target / "model.safetensors.index.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)  # loads unambiguously
    assert model.config.model_type == "llama"
    assert not (target / STAGING).exists() and not list(tmp_path.glob(".final*"))


def test_a_new_model_replaces_the_previous_models_files_listed_in_the_manifest(base_args, tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    accel.train({**base_args, "save_model_dir": str(target), "max_steps": 2})
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    accel.train({**base_args, "save_model_dir": str(target), "max_steps": 2, "peft_method": "lora"})
    names = {p.name for p in target.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    # the full model's own files went with it; the user's file stayed
    assert not names & {"model.safetensors", "config.json", "generation_config.json"}
    assert (target / "notes.txt").read_text() == "my notes"
    manifest = set(json.loads((target / MANIFEST).read_text())["files"])
    assert manifest == names - {"notes.txt", MANIFEST}


def test_files_keep_the_users_umask(base_args, tmp_path):
    target = tmp_path / "final"
    old = os.umask(0o027)
    try:
        accel.train(
            {
                **base_args,
                "save_model_dir": str(target),
                "max_steps": 2,
                "save_strategy": "steps",
                "save_steps": 2,
            }
        )
    finally:
        os.umask(old)
    assert _mode(target) == 0o750
    files = [p for p in target.iterdir() if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o640 for p in files}
    checkpoint = Path(base_args["output_dir"]) / "checkpoint-2"
    assert _mode(checkpoint / "model.safetensors") == 0o640  # safetensors alone writes 0600


def test_what_a_killed_save_left_is_cleaned_and_nothing_else(base_args, tmp_path):
    target = tmp_path / "final"
    staging = target / STAGING
    staging.mkdir(parents=True)
    (staging / MARKER).write_text("")
    (staging / "model.safetensors").write_bytes(b"\0" * 10)  # half-written by the killed save
    (target / (MANIFEST + ".accel-tmp")).write_text('{"files": [')
    log_tmp = Path(base_args["output_dir"]) / ".training_logs.jsonl.accel-tmp"
    log_tmp.parent.mkdir(parents=True)
    log_tmp.write_text('{"step": 1}\n')  # a killed rewrite of the log at resume
    accel.train({**base_args, "save_model_dir": str(target), "max_steps": 2})
    assert not staging.exists() and not (target / (MANIFEST + ".accel-tmp")).exists()
    assert not log_tmp.exists()
    assert (target / "model.safetensors").stat().st_size > 10

    # a folder of that name that accel did not make is the user's: refused before training
    staging.mkdir()
    (staging / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"\.accel-staging' exists and was not made by accel"):
        accel.train({**base_args, "save_model_dir": str(target), "max_steps": 2})
    assert (staging / "mine.txt").read_text() == "keep"


def test_save_model_dir_that_is_a_file_is_refused_before_training(base_args, tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="save_model_dir .* is a file"):
        accel.train({**base_args, "save_model_dir": str(path)})
    with pytest.raises(ConfigError, match="lies under the file"):
        accel.train({**base_args, "save_model_dir": str(path / "sub")})
    assert path.read_text() == "not a folder"


def _torchrun(port: int, args: dict, tmp_path: Path, name: str):
    import subprocess
    import sys

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", "accel.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_two_process_run_saves_once_beside_its_checkpoints_and_resumes(base_args, tmp_path):
    """torchrun, 2 gloo processes: every rank joins save_model, rank 0 alone moves the files in;
    a checkpoint missing one rank's RNG state is skipped (warned once) for the previous one."""
    out = Path(base_args["output_dir"])
    args = {
        **base_args,
        "per_device_train_batch_size": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "save_model_dir": str(out),
    }
    _torchrun(29660, args, tmp_path, "first")
    for step in (2, 4):
        names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= names
    assert _loss_steps(out / "training_logs.jsonl") == [1, 2, 3, 4]
    assert (out / "model.safetensors").is_file() and not (out / STAGING).exists()

    (out / "checkpoint-4" / "rng_state_1.pth").unlink()  # rank 1 was killed before writing it
    text = _torchrun(29661, {**args, "max_steps": 6}, tmp_path, "resumed")
    assert text.count("skipping") == 1 and "rng_state_1.pth missing" in text
    assert f"resuming from {out / 'checkpoint-2'}" in text
    assert _loss_steps(out / "training_logs.jsonl") == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    final, last = _weights(out), _weights(out / "checkpoint-6")
    assert all((final[k] == last[k]).all() for k in final)


def test_a_users_file_where_the_save_writes_one_of_that_name_is_kept(base_args, tmp_path, caplog):
    import logging

    target = tmp_path / "final"
    target.mkdir()
    (target / "README.md").write_text("# my project\n")  # PEFT writes a model card README.md
    args = {**base_args, "save_model_dir": str(target), "max_steps": 2, "peft_method": "lora"}
    with caplog.at_level(logging.WARNING, logger="accel"):
        accel.train(args)
    assert (target / "README.md").read_text() == "# my project\n"
    assert "kept your README.md" in caplog.text
    assert (target / "adapter_model.safetensors").is_file()
    assert "README.md" not in json.loads((target / MANIFEST).read_text())["files"]
    accel.train(args)  # saved again: still the user's
    assert (target / "README.md").read_text() == "# my project\n"

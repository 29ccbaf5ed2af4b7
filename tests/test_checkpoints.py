"""Auto-resume takes only complete, intact checkpoints of this run's model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import accel
from accel.errors import ConfigError
from accel.trainer.checkpoints import resolve_resume


def _losses(log_history):
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


def _lrs(log_history):
    return {h["step"]: h["learning_rate"] for h in log_history if "loss" in h}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, train_jsonl):
    """One 4-step run with checkpoints at steps 2 and 4 (copied per test, never modified)."""
    from accel.trainer.demo import RESPONSE_TEMPLATE, TEMPLATE

    out = tmp_path_factory.mktemp("trained") / "out"
    args = {
        "model_name_or_path": str(tiny_model_dir),
        "training_data_path": str(train_jsonl),
        "data_formatter_template": TEMPLATE,
        "response_template": RESPONSE_TEMPLATE,
        "max_seq_length": 48,
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "disable_tqdm": True,
        "seed": 7,
    }
    accel.train(args)
    return out


@pytest.fixture
def out(trained, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(trained, copy)
    return copy


def _truncate(path: Path, keep: float = 0.5) -> None:
    """What a process killed while writing ``path`` leaves: the beginning of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"],
)
def test_damaged_newest_checkpoint_falls_back_with_a_warning(out, name, caplog):
    _truncate(out / "checkpoint-4" / name)
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) == str(out / "checkpoint-2")
    warning = caplog.text
    assert "checkpoint-4" in warning and name in warning
    # named explicitly, the damaged checkpoint is an error naming the file
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        resolve_resume(str(out / "checkpoint-4"), str(out))


def test_missing_files_of_an_unfinished_save_are_named(out, caplog):
    (out / "checkpoint-4" / "rng_state.pth").unlink()
    (out / "checkpoint-4" / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) == str(out / "checkpoint-2")
    assert "scheduler.pt" in caplog.text and "RNG state" in caplog.text
    # a multi-process save writes one RNG file per rank: rank 1's is missing, then rank 2's
    ranks = out / "checkpoint-2"
    for rank in (0, 1, 3):
        shutil.copy(ranks / "rng_state.pth", ranks / f"rng_state_{rank}.pth")
    (ranks / "rng_state.pth").unlink()
    with pytest.raises(ConfigError, match=r"rng_state_2\.pth missing"):
        resolve_resume(str(ranks), str(out))
    (ranks / "rng_state_3.pth").unlink()
    (ranks / "rng_state_1.pth").unlink()
    with pytest.raises(ConfigError, match=r"rng_state_1\.pth missing"):
        resolve_resume(str(ranks), str(out))
    shutil.copy(ranks / "rng_state_0.pth", ranks / "rng_state_1.pth")  # saved by 2 processes
    assert resolve_resume(str(ranks), str(out)) == str(ranks)


def test_no_intact_checkpoint_left_starts_fresh(out, caplog):
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    _truncate(out / "checkpoint-2" / "model.safetensors", keep=0.99)
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) is None
    assert "model.safetensors is truncated" in caplog.text
    assert "no intact checkpoint left" in caplog.text


def test_folders_that_are_not_checkpoints_are_skipped(out, caplog):
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "notes.txt").write_text("mine")
    (out / "checkpoint-10").write_text("a file, not a folder")
    (out / "checkpoint-best").mkdir()
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) == str(out / "checkpoint-4")
    assert "checkpoint-9: not a checkpoint" in caplog.text
    assert (out / "checkpoint-9" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="not a checkpoint"):
        resolve_resume(str(out / "checkpoint-9"), str(out))


def test_model_only_checkpoint_is_refused(base_args, tmp_path):
    args = {**base_args, "save_strategy": "steps", "save_steps": 2, "save_only_model": True}
    accel.train({**args, "max_steps": 2})
    out = Path(args["output_dir"])
    assert not (out / "checkpoint-2" / "optimizer.pt").exists()
    with pytest.raises(ConfigError, match="save_only_model") as err:
        accel.train(args)
    message = str(err.value)
    assert "checkpoint-2" in message and "--model_name_or_path" in message
    assert "resume_from_checkpoint False" in message
    with pytest.raises(ConfigError, match="save_only_model"):
        accel.train({**args, "resume_from_checkpoint": str(out / "checkpoint-2")})
    # on the command line: one error line, exit 2
    config = tmp_path / "run.json"
    config.write_text(json.dumps(args))
    cli = subprocess.run(
        [sys.executable, "-m", "accel.cli", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip().splitlines()[-1].startswith("accel: error: ")
    assert "save_only_model" in cli.stderr
    # training on from the weights, as the message says, works
    result = accel.train(
        {
            **args,
            "model_name_or_path": str(out / "checkpoint-2"),
            "output_dir": str(tmp_path / "from-weights"),
        }
    )
    assert result.summary["train_steps"] == 4


def test_another_models_checkpoints_are_an_error(base_args, tmp_path):
    from accel.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "wider", hidden_size=48, intermediate_size=96)
    args = {**base_args, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    accel.train({**args, "model_name_or_path": str(other)})
    with pytest.raises(ConfigError, match="another model's: hidden_size 48") as err:
        accel.train(args)
    assert "output_dir" in str(err.value) and "resume_from_checkpoint False" in str(err.value)
    # a LoRA run over full-weight checkpoints (same base) is another run's too
    with pytest.raises(ConfigError, match="full model weights but this run uses peft_method lora"):
        accel.train({**args, "model_name_or_path": str(other), "peft_method": "lora"})
    # starting fresh on purpose is allowed
    result = accel.train({**args, "resume_from_checkpoint": False})
    assert result.summary["train_steps"] == 2
    # an adapter trained on another base model: its base's config tells
    lora = {**args, "peft_method": "lora", "output_dir": str(tmp_path / "lora")}
    accel.train({**lora, "model_name_or_path": str(other)})
    with pytest.raises(ConfigError, match="another model's: hidden_size 48"):
        accel.train(lora)


def test_lora_checkpoint_of_another_rank_is_an_error(base_args):
    args = {**base_args, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    accel.train({**args, "peft_method": "lora", "r": 4})
    with pytest.raises(ConfigError, match="r 4, this run uses r 8"):
        accel.train({**args, "peft_method": "lora", "r": 8})
    result = accel.train({**args, "peft_method": "lora", "r": 4, "max_steps": 3})
    assert result.summary["train_steps"] == 3


_KILLED_RUN = textwrap.dedent(
    """
    import json, os, sys
    import transformers.trainer
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class DieDuringSave(TrainerCallback, ExportableState):
        # Trainer._save_checkpoint asks stateful callbacks for their state after the weights,
        # optimizer, scheduler and RNG state are written and before trainer_state.json: the
        # process dies there, at the step given, without any cleanup (like SIGKILL).
        step = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.step = state.global_step

        def state(self):
            if self.step == int(os.environ["DIE_AT_STEP"]):
                os._exit(137)
            return {"args": {}, "attributes": {}}

    transformers.trainer.DEFAULT_CALLBACKS.append(DieDuringSave)
    import accel

    accel.train(json.loads(sys.argv[1]))
    """
)


def test_killed_checkpoint_save_resumes_from_the_previous_one(base_args, tmp_path, caplog):
    args = {**base_args, "max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    uninterrupted = accel.train({**args, "output_dir": str(tmp_path / "uninterrupted")})
    out = Path(args["output_dir"])
    env = {**os.environ, "DIE_AT_STEP": "4", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()  # the save was under way
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()
    with caplog.at_level(logging.WARNING, logger="accel"):
        resumed = accel.train(args)
    assert "skipping" in caplog.text and "checkpoint-4" in caplog.text
    assert resumed.summary["train_steps"] == 6
    expected = _losses(uninterrupted.log_history)
    got = _losses(resumed.log_history)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-2 from checkpoint-2's history
    for step in (3, 4, 5, 6):  # retrained from checkpoint-2: the same trajectory
        assert got[step] == pytest.approx(expected[step], abs=1e-5)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # rewritten complete
    # the log follows the resumed run: the killed run's steps 3-4 are not there twice
    logged = [json.loads(x) for x in (out / "training_logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_larger_max_steps_rebuilds_the_schedule(out, base_args, caplog):
    args = {
        **base_args,
        "output_dir": str(out),
        "max_steps": 8,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    with caplog.at_level(logging.WARNING, logger="accel"):
        result = accel.train(args)
    assert "max_steps 4" in caplog.text and "rebuilt for 8 steps" in caplog.text
    lrs = _lrs(result.log_history)
    # the first run's linear schedule (4 steps) had reached 0; the new one (8 steps) continues
    # from step 4: lr(step n) = 1e-3 * (8 - (n - 1)) / 8
    for step in (5, 6, 7, 8):
        assert lrs[step] == pytest.approx(1e-3 * (8 - (step - 1)) / 8, rel=1e-6)


def test_sharded_weights_need_every_shard_of_their_index(out, caplog):
    from safetensors.torch import load_file, save_file

    folder = out / "checkpoint-4"
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert resolve_resume(None, str(out)) == str(folder)  # sharded and complete: fine
    (folder / "model-00002-of-00002.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) == str(out / "checkpoint-2")
    assert "model-00002-of-00002.safetensors, listed in model.safetensors.index.json" in (
        caplog.text
    )


def test_load_time_sharded_run_refuses_a_checkpoint_of_another_layout(out, base_args, monkeypatch):
    """fsdp_size (and --fast_moe N) checkpoints are sharded DCP state: a checkpoint of an
    unsharded run, whose optimizer.pt does not fit sharded parameters, is refused before
    anything loads, auto-resumed or named."""
    from accel.trainer import distributed
    from accel.trainer.parsing import parse_mapping

    sharded = {**base_args, "output_dir": str(out), "fsdp_size": 2}
    auto, named, fresh = (
        parse_mapping({**sharded, **extra})
        for extra in ({}, {"resume_from_checkpoint": str(out / "checkpoint-2")},
                      {"resume_from_checkpoint": "False"})
    )  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, once the arguments are parsed
    with pytest.raises(ConfigError, match="checkpoint-4 \\(auto-resume\\): it was written by a"):
        distributed.check_launch(auto)
    with pytest.raises(ConfigError, match="checkpoint-2: it was written by a run that was not"):
        distributed.check_launch(named)
    distributed.check_launch(fresh)


def test_sharded_checkpoint_is_not_resumed_by_an_unsharded_run(out, base_args):
    """The other way round: a run that does not shard at load time names the way out."""
    from accel.trainer.sharded_checkpoint import MARKER

    (out / "checkpoint-4" / MARKER).write_text('{"written_by": "accel", "processes": 2}\n')
    with pytest.raises(ConfigError, match="sharded state of a model sharded at load time"):
        accel.train({**base_args, "output_dir": str(out), "max_steps": 6})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_sharded_checkpoint_exports_to_a_plain_model(tiny_model_dir, tmp_path, tied):
    """The export of the DCP layout (written here by one process: DCP does not need a process
    group) is the model itself: same tensors and dtypes, same logits, tied weights tied."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from accel.trainer.sharded_checkpoint import export_checkpoint, layout_of, save_state

    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.bfloat16)  # kept as is
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    save_state(model, torch.optim.AdamW(model.parameters()), ckpt, layout_of(model, 1))
    model.config.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(ckpt)

    target = export_checkpoint(ckpt, tmp_path / "plain")
    assert not list(tmp_path.glob(".*accel-staging"))
    saved = load_file(Path(target) / "model.safetensors")
    assert saved["model.norm.weight"].dtype == torch.bfloat16
    assert ("lm_head.weight" in saved) is not tied  # a tied head is not stored twice
    want = model.state_dict()
    for name, value in saved.items():
        assert torch.equal(value, want[name]), name
    plain = AutoModelForCausalLM.from_pretrained(target)
    AutoTokenizer.from_pretrained(target)
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) is tied
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)

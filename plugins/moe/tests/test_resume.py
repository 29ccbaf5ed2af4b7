"""Checkpoint and resume of models sharded at load time (2 gloo processes): ``--fast_moe 2``
(transformers' EP with FSDP 2) and the core's ``fsdp_size 2`` (``--fast_moe True``: experts
FSDP2-sharded like the rest), and ``accel moe export`` of their sharded checkpoints.

One torchrun launch (tests/dist_resume_worker.py) runs, per layout, 4 steps uninterrupted with a
checkpoint every 2 steps, then the same run stopped after its step-2 checkpoint, then that run
resumed to step 4: the resumed parameters are identical to the uninterrupted ones. The
checkpoints are sharded torch.distributed.checkpoint state; the export reads one in this
single process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import failure, records, torchrun, write_args
from torch.distributed.checkpoint import FileSystemReader

PORT = 29720
WORKER = Path(__file__).parents[3] / "tests" / "dist_resume_worker.py"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    from moe_models import save_moe_model

    from accel.testing import cipher_run_args
    from accel.trainer.demo import make_examples

    root = tmp_path_factory.mktemp("ep-resume")
    save_moe_model(root / "model", "mixtral")  # with the router's auxiliary loss
    rows = make_examples(32, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = cipher_run_args(
        root / "model", root / "train.jsonl", learning_rate=1e-2, per_device_train_batch_size=4,
        fast_moe=2, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    lora = {"peft_method": "lora", "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    scenarios = {
        "ep2": args,
        "fsdp2": {**args, "fast_moe": True, "fsdp_size": 2},
        "ep2-lora": {**args, **lora},
    }
    done = torchrun(PORT, str(WORKER), write_args(root / "a.json", scenarios), str(root), "2")
    assert done.returncode == 0, failure(done)
    return {"root": root, "stdout": done.stdout}


@pytest.mark.parametrize(
    ("layout", "sizes"),
    [("ep2", (2, 2, 2)), ("fsdp2", (2, 1, 2)), ("ep2-lora", (2, 2, 2))],
    ids=["ep2", "fsdp_size2", "ep2-lora"],
)
def test_resumed_run_ends_identical_to_the_uninterrupted_one(resumed, layout, sizes):
    root: Path = resumed["root"] / layout
    assert "accel: resuming from " + str(root / "resumed-out" / "checkpoint-2") in resumed["stdout"]
    ckpt = root / "resumed-out" / "checkpoint-2"
    assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (ckpt / "optimizer_0" / ".metadata").is_file()
    lora = layout.endswith("lora")
    # no gathered copy of the model at each save; a PEFT adapter is saved as usual
    weights = [p.name for p in ckpt.glob("*.safetensors")]
    assert weights == (["adapter_model.safetensors"] if lora else [])
    written = json.loads((ckpt / "load_time_sharding.json").read_text())
    assert (written["processes"], written.get("ep_size"), written["fsdp_size"]) == sizes
    assert written["peft"] is lora
    dcp = FileSystemReader(str(ckpt / "pytorch_model_fsdp_0")).read_metadata()
    held = list(dcp.state_dict_metadata)  # PEFT: the trainable adapter weights only
    assert len(held) == (8 if lora else 21) and all(("lora_" in k) is lora for k in held)
    full, again = records(root / "full"), records(root / "resumed")
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in (*full, *again)]
    assert len(losses[0]) == 4 and all(run == losses[0] for run in losses)
    for rank in range(2):
        name = next(n for n in full[0]["params"] if n.endswith("0.mlp.experts.gate_up_proj"))
        # split: EP, or FSDP2 on dim 0
        assert again[rank]["local_numel"][name] * 2 == again[rank]["params"][name].numel()
        assert sorted(again[rank]["params"]) == sorted(full[0]["params"])
        for name, value in full[0]["params"].items():  # every rank, bit for bit
            assert torch.equal(again[rank]["params"][name], value), name
            assert torch.equal(full[rank]["params"][name], value), name


def test_export_of_a_sharded_checkpoint_reloads_in_one_process(resumed, tmp_path, capsys):
    """checkpoint-4 (the uninterrupted run's last) exported without torchrun equals that run's
    final model, which rank 0 gathered: same tensors, same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accel.cli.main import main

    root: Path = resumed["root"] / "ep2"
    assert (
        main(["moe", "export", str(root / "full-out" / "checkpoint-4"), str(tmp_path / "m")]) == 0
    )
    assert "plain model written to" in capsys.readouterr().out
    got, want = (
        load_file(tmp_path / "m" / "model.safetensors"),
        load_file(root / "full-model" / "model.safetensors"),
    )
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    AutoTokenizer.from_pretrained(tmp_path / "m")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    final = AutoModelForCausalLM.from_pretrained(root / "full-model").eval()
    assert exported.config.num_local_experts == 4
    ids = torch.randint(4, 60, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, final(input_ids=ids).logits,
                                   rtol=0, atol=0)  # fmt: skip


def test_export_refusals_are_one_line(resumed, tmp_path, capsys):
    from accel.cli.main import main

    root: Path = resumed["root"] / "ep2"
    ckpt = root / "full-out" / "checkpoint-4"
    cases = [
        ([str(ckpt), str(root / "full-model")], "exists; give a new folder"),
        ([str(root / "full-model"), str(tmp_path / "a")], "already holds plain Hugging Face"),
        ([str(tmp_path / "none"), str(tmp_path / "b")], "is not a checkpoint folder"),
    ]
    lora_ckpt = resumed["root"] / "ep2-lora" / "full-out" / "checkpoint-4"
    cases.append(([str(lora_ckpt), str(tmp_path / "d")], "already saved there as a plain PEFT"))
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "pytorch_model_fsdp_0" / ".metadata").unlink()  # a save killed before its end
    cases.append(([str(broken), str(tmp_path / "c")], "did not finish"))
    for argv, message in cases:
        assert main(["moe", "export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("accel: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("folder", ["pytorch_model_fsdp_0", "optimizer_0"])
def test_unfinished_sharded_save_is_skipped_by_auto_resume(resumed, tmp_path, caplog, folder):
    """DCP writes a folder's .metadata once every process has written its shards: without it,
    auto-resume falls back to the previous checkpoint."""
    import logging

    from accel.trainer.checkpoints import resolve_resume

    out = tmp_path / "out"
    shutil.copytree(resumed["root"] / "ep2" / "full-out", out)
    assert resolve_resume(None, str(out)) == str(out / "checkpoint-4")
    (out / "checkpoint-4" / folder / ".metadata").unlink()
    with caplog.at_level(logging.WARNING, logger="accel"):
        assert resolve_resume(None, str(out)) == str(out / "checkpoint-2")
    assert f"{folder}/.metadata is missing" in caplog.text


# A hand-written loop (no Trainer) over an EP 2 model: one step's gradients live on the expert
# mesh, the FSDP mesh and nowhere (plain tensors); torch's clip_grad_norm_ cannot span them.
_CLIP_WORKER = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from accel_moe.parallel import clip_grad_norm_

model_dir, out = sys.argv[1], sys.argv[2]
config = DistributedConfig(fsdp_size=2, ep_size=2, ep_implementation="all_to_all")
model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=config)
rank = dist.get_rank()
ids = torch.load(f"{out}/ids.pt")[2 * rank : 2 * rank + 2]
model(input_ids=ids, labels=ids).loss.backward()
meshes = {p.grad.device_mesh.mesh_dim_names for p in model.parameters() if isinstance(p.grad, DTensor)}
try:
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    torch_error = None
except Exception as err:  # what a plain loop hits on mixed meshes
    torch_error = type(err).__name__
norm = clip_grad_norm_(model.parameters(), 0.5)
grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
         for n, p in model.named_parameters()}
torch.save({"norm": norm, "grads": grads, "meshes": sorted(meshes), "torch_error": torch_error},
           f"{out}/rank{rank}.pt")
dist.barrier()  # both records written; then shut gloo down before the interpreter exits
dist.destroy_process_group()
"""


def test_hand_written_loop_clips_by_the_global_norm_on_mixed_meshes(tmp_path):
    """accel_moe.parallel.clip_grad_norm_ on EP 2 (FSDP 2) gradients: the norm and the clipped
    gradients of one process over the same global batch, on every rank."""
    from moe_models import save_moe_model
    from transformers import AutoModelForCausalLM

    save_moe_model(tmp_path / "model", "mixtral", output_router_logits=False)
    ids = torch.randint(4, 60, (4, 12))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "clip.py").write_text(_CLIP_WORKER)
    done = torchrun(PORT + 1, str(tmp_path / "clip.py"), str(tmp_path / "model"), str(tmp_path))
    assert done.returncode == 0, failure(done)

    one = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    # each process's loss is the mean over its own (equally many) tokens, FSDP averages them
    loss = one(input_ids=ids[:2], labels=ids[:2]).loss + one(input_ids=ids[2:], labels=ids[2:]).loss
    (loss / 2).backward()
    want = torch.nn.utils.clip_grad_norm_(one.parameters(), 0.5)
    assert want > 0.5  # the step really clips
    for rank in records(tmp_path):
        assert len(rank["meshes"]) >= 2 and rank["torch_error"] is not None
        torch.testing.assert_close(rank["norm"], want, rtol=1e-5, atol=0)
        for name, param in one.named_parameters():
            torch.testing.assert_close(rank["grads"][name], param.grad, rtol=1e-4, atol=1e-7,
                                       msg=name)  # fmt: skip

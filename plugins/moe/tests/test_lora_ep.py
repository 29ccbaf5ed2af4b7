"""LoRA on attention, experts and router under ``--fast_moe 2`` (2 gloo processes under
torchrun: transformers' EP 2 with FSDP 2) against one process at the same global batch: the
same losses and Trainer grad norms (every step clipped); the expert factors sharded like the
experts (half of every factor per process), the router and attention factors replicated; every
factor, gathered, the same on both processes and equal to the single run's (the router's only
if its gradient was reduced across processes); base weights untouched; the saved adapter is a
vanilla PEFT adapter that loads on the plain HF model in one process and gives the single
run's logits; the run's sharded checkpoint resumes to the same factors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import failure, records, saved_weights, torchrun, write_args
from dist_worker import recording_train

PORT = 29780
#: runs a scenario uninterrupted (recorded), then stopped after its step-2 checkpoint, then
#: resumed from it (recorded): one torchrun launch for the comparison and the resume
RESUME_WORKER = Path(__file__).parents[3] / "tests" / "dist_resume_worker.py"

# max_grad_norm below the run's grad norms: every step is clipped, by the global norm over the
# replicated factors and the expert factors sharded on the ep mesh (the Trainer's per-mesh norm)
LORA = {"peft_method": "lora", "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "max_grad_norm": 0.3}  # fmt: skip


def _moe(ep_degree):
    moe = {"ep_degree": ep_degree, "lora_experts": True, "lora_router": True}
    return {"plugins": {"training": {"moe": {"scattermoe": moe}}}}


@pytest.fixture(scope="module")
def lora_runs(moe_run_dir, tmp_path_factory):
    from moe_models import save_moe_model

    import accel
    from accel.testing import cipher_run_args
    from accel.trainer.trainer import AccelTrainer

    root = tmp_path_factory.mktemp("lora-ep")
    # without the auxiliary loss, which each process computes over its own tokens (see
    # test_expert_parallel.py), so the two runs can be compared to fp32 rounding
    save_moe_model(root / "model", "mixtral", output_router_logits=False)
    base = {**cipher_run_args(root / "model", moe_run_dir / "train.jsonl", learning_rate=1e-2)}
    ep = {**base, **LORA, **_moe(2), "per_device_train_batch_size": 4,
          "save_strategy": "steps", "save_steps": 2}  # fmt: skip
    scenarios = write_args(root / "ep.json", {"ep": ep})
    done = torchrun(PORT, str(RESUME_WORKER), scenarios, str(root), "2")
    assert done.returncode == 0, failure(done)

    mp = pytest.MonkeyPatch()
    mp.setattr(AccelTrainer, "train", recording_train(root / "one"))
    (root / "one").mkdir()
    try:
        accel.train(
            {**base, **LORA, **_moe(True), "per_device_train_batch_size": 8,
             "output_dir": str(root / "one-out"), "save_model_dir": str(root / "one-adapter")}
        )  # fmt: skip
    finally:
        mp.undo()
    return {"root": root, "ranks": records(root / "ep" / "full"), "stdout": done.stdout,
            "resumed": records(root / "ep" / "resumed"), "adapter": root / "ep" / "full-model",
            "one": records(root / "one", 1)[0], "model": root / "model"}  # fmt: skip


def _history(record, key):
    return [h[key] for h in record["log_history"] if key in h]


def _lora(record, experts=4):
    """The LoRA factors a run recorded, in PEFT's order (a sharded expert ``lora_B`` is held
    expert-major while training under EP; its gathered tensor is reordered here)."""
    from accel_moe.lora import peft_order_of_b

    factors = {n: v for n, v in record["params"].items() if "lora_" in n}
    for name, value in factors.items():
        if record["param_types"][name] == "DTensor" and ".lora_B." in name:
            factors[name] = peft_order_of_b(value, experts)
    return factors


def test_ep2_lora_on_experts_and_router_matches_one_process(lora_runs):
    ranks, one = lora_runs["ranks"], lora_runs["one"]
    assert "expert parallel over 2 processes" in lora_runs["stdout"]
    assert "LoRA also on: experts, router" in lora_runs["stdout"]
    trained = _lora(one)
    experts = [n for n in trained if ".experts." in n]
    router = [n for n in trained if ".mlp.gate." in n]
    attention = [n for n in trained if ".self_attn." in n]
    # 2 layers x (gate_up_proj, down_proj) x (A, B); 2 layers x router (A, B); q, v x (A, B)
    assert (len(experts), len(router), len(attention)) == (8, 4, 8)
    assert min(_history(one, "grad_norm")) > LORA["max_grad_norm"]
    for rank in ranks:
        assert sorted(_lora(rank)) == sorted(trained)
        for name in experts:  # sharded like the experts: half of every factor per process
            assert rank["param_types"][name] == "DTensor", name
            assert rank["local_numel"][name] * 2 == trained[name].numel(), name
        for name in router + attention:  # replicated
            assert rank["param_types"][name] == "Parameter", name
        assert _history(rank, "loss") == pytest.approx(_history(one, "loss"), rel=1e-5)
        assert _history(rank, "grad_norm") == pytest.approx(_history(one, "grad_norm"), rel=1e-4)
    gathered = [_lora(rank) for rank in ranks]
    for name, value in trained.items():
        # the same on both processes (gathered), and the single run's to fp32 rounding (the
        # experts sum in another order; Adam's first steps divide each gradient element by its
        # own size, so rounding shows up to ~1e-5 against factors of ~2e-2); the router's
        # factors match only because their gradient is averaged over the processes
        assert torch.equal(gathered[0][name], gathered[1][name]), name
        torch.testing.assert_close(gathered[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for name in experts + router:
        if "lora_B" in name:  # PEFT starts B at zero: the factors really trained
            assert trained[name].abs().max() > 1e-3, name


def test_ep2_lora_leaves_the_base_weights_untouched(lora_runs):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(lora_runs["model"]).state_dict()
    rank = lora_runs["ranks"][0]
    base = {n: v for n, v in rank["params"].items() if "lora_" not in n}
    assert any(".experts." in n for n in base)
    for name, value in base.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, initial[key]), name


def test_ep2_adapter_is_vanilla_peft_and_reproduces_the_logits(lora_runs):
    """The saved adapter is the gathered one (every expert), in PEFT's format: vanilla
    ``PeftModel.from_pretrained`` on the plain model (eager experts, one process) loads it and
    gives the logits of the single run's adapter, which holds the same factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = lora_runs["root"]
    config = json.loads((lora_runs["adapter"] / "adapter_config.json").read_text())
    assert any(t.endswith("experts.gate_up_proj") for t in config["target_parameters"])
    assert any(t.endswith("mlp.gate.weight") for t in config["target_parameters"])
    saved = saved_weights(lora_runs["adapter"])
    trained = {n.replace(".default", ""): v for n, v in _lora(lora_runs["ranks"][0]).items()}
    assert sorted(saved) == sorted(trained)
    for name, value in saved.items():  # full tensors, the EP run's trained factors
        assert torch.equal(value, trained[name]), name

    ids = torch.randint(4, 60, (2, 11))
    logits = []
    for adapter in (lora_runs["adapter"], root / "one-adapter"):
        plain = AutoModelForCausalLM.from_pretrained(lora_runs["model"])
        assert plain.config._experts_implementation != "scattermoe"
        model = PeftModel.from_pretrained(plain, str(adapter)).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    untuned = AutoModelForCausalLM.from_pretrained(lora_runs["model"]).eval()
    with torch.no_grad():
        before = untuned(input_ids=ids).logits
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    assert (logits[0] - before).abs().max() > 1e-3  # the adapter changed something


def test_lora_on_experts_with_dropout_is_refused_in_one_line(run_args, tmp_path):
    """PEFT's LoRA on parameters has no dropout: the core's default (0.05) is named, not
    PEFT's traceback from inside the wrapping."""
    import accel
    from accel import ConfigError

    args = {**run_args, **LORA, **_moe(True), "lora_dropout": 0.05, "output_dir": str(tmp_path)}
    with pytest.raises(
        ConfigError, match="has no dropout .lora_dropout is 0.05.; set lora_dropout 0"
    ):
        accel.train(args)


def test_ep2_lora_checkpoint_is_sharded_and_resumes_identically(lora_runs):
    """The step-2 checkpoint holds the expert factors as DCP shards written by both processes
    (and the plain PEFT adapter beside them); the run resumed from it ends with every factor
    identical to the uninterrupted run's."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = lora_runs["root"] / "ep" / "resumed-out" / "checkpoint-2"
    assert "accel: resuming from " + str(ckpt) in lora_runs["stdout"]
    assert (ckpt / "adapter_model.safetensors").is_file()
    held = FileSystemReader(str(ckpt / "pytorch_model_fsdp_0")).read_metadata()
    factors = {k: m for k, m in held.state_dict_metadata.items() if "lora_" in k}
    assert len(factors) == 20
    for key, meta in factors.items():  # one chunk per process for the expert factors
        assert len(meta.chunks) == (2 if ".experts." in key else 1), key
    full, again = lora_runs["ranks"], lora_runs["resumed"]
    assert [_history(r, "loss") for r in again] == [_history(full[0], "loss")] * 2
    for rank in range(2):
        for name, value in _lora(full[rank]).items():
            assert torch.equal(_lora(again[rank])[name], value), name


def test_expert_major_lora_b_holds_each_experts_columns_together():
    """PEFT's ``lora_B`` columns are ``i * E + e`` (rank index i, expert e); held expert-major
    (``e * r + i``), a process's contiguous ``Shard(1)`` slice is exactly its experts' columns,
    and the gathered tensor goes back to PEFT's order."""
    from accel_moe.lora import _expert_major_b, peft_order_of_b

    out, r, experts = 3, 2, 4
    column = torch.tensor([[100 * e + i for i in range(r) for e in range(experts)]] * out)
    held = _expert_major_b(column, experts)
    want = torch.tensor([[100 * e + i for e in range(experts) for i in range(r)]] * out)
    assert torch.equal(held, want)
    second_half = held[:, experts // 2 * r :]  # the second of two processes: experts 2 and 3
    assert set(second_half.flatten().tolist()) == {200, 201, 300, 301}
    assert torch.equal(peft_order_of_b(held, experts), column)

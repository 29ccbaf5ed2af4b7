"""odm through the real trainer on a tiny Llama: rewards from the training forward (padded
and padding-free), validation_loss at eval_steps, odm.jsonl, an exact resume, bad settings."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from odm_fixtures import odm_args, odm_lines, write_datasets, write_odm_config

import accel
from accel import ConfigError
from accel.testing import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("odm-model"))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp("odm-data"))


def test_per_example_loss_matches_the_model_loss_padded_and_packed(model_dir, monkeypatch):
    """The per-example sums reproduce the model's own loss, per row and per packed segment
    (computed a few positions at a time, as for a large vocabulary)."""
    from accel_odm import rewards

    monkeypatch.setattr(rewards, "CHUNK", 4)
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from accel_attention_packing.collator import PaddingFreeCollator
    from accel_odm.rewards import per_example_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [[1, 5, 6, 7, 2], [1, 8, 9, 2], [1, 4, 4, 4, 4, 4, 2]]
    features = [{"input_ids": r, "labels": [-100, -100, *r[2:]]} for r in rows]
    from transformers import AutoTokenizer

    padded = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(model_dir), padding=True)(
        features
    )
    out = model(**padded)
    sums, tokens = per_example_loss(out.logits, padded["labels"])
    assert tokens.tolist() == [3, 2, 5]
    assert (sums.sum() / tokens.sum()).item() == pytest.approx(out.loss.item(), rel=1e-5)
    from accel_attention_packing.attention import (
        VARLEN_ATTENTION_NAME,
        disable_kv_cache,
        register_varlen_attention,
    )

    register_varlen_attention()  # attention within each packed example, as padding_free runs
    model.set_attn_implementation(VARLEN_ATTENTION_NAME)
    disable_kv_cache(model)
    packed = PaddingFreeCollator()(features)
    out_packed = model(**packed)
    psums, ptokens = per_example_loss(out_packed.logits, packed["labels"], packed["cu_seq_lens_q"])
    assert ptokens.tolist() == [3, 2, 5]
    assert psums.tolist() == pytest.approx(sums.tolist(), rel=1e-4)  # each segment = its row


def test_odm_trains_logs_every_update_and_reports_counts(model_dir, paths, tmp_path, monkeypatch):
    from accel_odm import rewards

    def second_pass(*args, **kwargs):
        raise AssertionError("train_loss with the default loss takes one cross-entropy")

    monkeypatch.setattr(rewards, "per_example_sums", second_pass)
    cfg = write_odm_config(tmp_path, paths, gamma=0.3, eta=0.5)
    result = accel.train(odm_args(model_dir, cfg, tmp_path / "out"))
    lines = odm_lines(tmp_path / "out")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]  # one line per update
    assert lines[0]["datasets"] == ["easy", "medium", "hard"]
    for line in lines:
        assert min(line["probabilities"]) >= 0.3 / 3 - 1e-12
        assert sum(line["counts"]) == 4 * line["step"]
    # rewards are each dataset's own loss: the repeated letter is learnt first
    easy = [line["rewards"][0] for line in lines if line["rewards"][0] is not None]
    hard = [line["rewards"][2] for line in lines if line["rewards"][2] is not None]
    assert easy[-1] < hard[-1]
    counts = dict(zip(lines[-1]["datasets"], lines[-1]["counts"]))
    assert result.summary["examples_per_dataset"] == counts
    plugin = result.framework.get("odm")
    assert [s for s, _ in plugin.history] == [1, 2, 3, 4, 5, 6]
    assert "EXP3 reward train_loss" in result.framework.report()


def test_odm_with_padding_free_and_lora_rewards_each_packed_segment(model_dir, paths, tmp_path):
    """Under LoRA the wrapped loss is the base model's; under padding-free one row is packed."""
    cfg = write_odm_config(tmp_path, paths)
    args = odm_args(model_dir, cfg, tmp_path / "out", max_steps=3, padding_free=["huggingface"])
    result = accel.train({**args, "peft_method": "lora", "r": 4, "lora_alpha": 8})
    assert result.framework.names == ["odm", "padding_free"]
    lines = odm_lines(tmp_path / "out")
    assert len(lines) == 3
    assert sum(line["observed"][i] for line in lines for i in range(3)) == 12  # 3 steps x 4


def test_validation_loss_reward_updates_at_eval_steps(model_dir, paths, tmp_path):
    cfg = write_odm_config(tmp_path, paths, split=True, reward_type="validation_loss")
    args = odm_args(
        model_dir,
        cfg,
        tmp_path / "out",
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
    )
    result = accel.train(args)
    lines = odm_lines(tmp_path / "out")
    assert [line["step"] for line in lines] == [2, 4]
    evals = {k: v for h in result.log_history for k, v in h.items() if h.get("step") == 4}
    assert lines[1]["rewards"] == pytest.approx(
        [evals["eval_easy_loss"], evals["eval_medium_loss"], evals["eval_hard_loss"]]
    )


def test_interrupted_and_resumed_run_makes_the_same_decisions(model_dir, paths, tmp_path):
    """Run 8 steps with checkpoints at 4 and 8; drop checkpoint-8 and the model's later
    progress, resume from checkpoint-4: every update after it is the same."""
    cfg = write_odm_config(tmp_path, paths, gamma=0.2, eta=1.0, update_interval=2)
    out = tmp_path / "out"
    args = odm_args(
        model_dir,
        cfg,
        out,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        lr_scheduler_type="constant",
        gradient_accumulation_steps=2,
    )
    accel.train(args)
    straight = odm_lines(out)
    assert [line["step"] for line in straight] == [2, 4, 6, 8]
    state = json.loads((out / "checkpoint-4" / "odm_state.json").read_text())
    assert state["sampler"]["step"] == 8  # 4 steps x 2 accumulated batches
    shutil.rmtree(out / "checkpoint-8")
    resumed = accel.train(args)
    again = odm_lines(out)
    assert [line["step"] for line in again] == [2, 4, 6, 8]
    assert again[:2] == straight[:2]  # kept from before the interruption
    for a, b in zip(again[2:], straight[2:]):
        assert a["counts"] == b["counts"]
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)
    assert resumed.summary["examples_per_dataset"] == dict(
        zip(straight[-1]["datasets"], straight[-1]["counts"])
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"odm": ["gradnorm"]}, "reward_type 'gradnorm' is not supported .a step's gradient"),
        ({"dataloader_num_workers": 1}, "set dataloader_num_workers 0"),
    ],
)
def test_bad_odm_settings_are_clear_errors(model_dir, paths, tmp_path, extra, message):
    cfg = write_odm_config(tmp_path, paths)
    with pytest.raises(ConfigError, match=message):
        accel.train(odm_args(model_dir, cfg, tmp_path / "out", max_steps=1, **extra))


def test_odm_without_an_odm_data_config_is_an_error(model_dir, paths, tmp_path):
    args = odm_args(model_dir, paths[0], tmp_path / "out", max_steps=1)
    args["training_data_path"] = str(args.pop("data_config"))
    with pytest.raises(ConfigError, match="pass --data_config with dataprocessor.type: odm"):
        accel.train(args)


def test_validation_loss_without_splits_is_an_error(model_dir, paths, tmp_path):
    cfg = write_odm_config(tmp_path, paths, reward_type="validation_loss")
    with pytest.raises(ConfigError, match="validation split of every dataset"):
        accel.train(odm_args(model_dir, cfg, tmp_path / "out", max_steps=1))


def test_rewards_are_not_taken_from_eval_or_no_grad_forwards(model_dir):
    from transformers import AutoModelForCausalLM

    from accel import AccelerationFramework
    from accel.registry import PluginInfo
    from accel_odm.plugin import OdmPlugin

    fw = AccelerationFramework(
        {"plugins": {"training": {"odm": {"odm": {}}}}},
        available={"odm": PluginInfo("odm", OdmPlugin, "accel-odm", "0.1.0", "")},
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    fw.apply_patches(model)
    plugin = fw.get("odm")
    ids = torch.tensor([[1, 5, 6, 2]])
    with torch.no_grad():
        model(input_ids=ids, labels=ids)  # no sampler yet, no grad: nothing recorded
    model.eval()
    model(input_ids=ids, labels=ids)
    assert plugin.totals is None
    fw.revert_patches()
    assert "_loss_function" not in vars(model)


def test_fused_linear_loss_is_refused_with_the_way_out(model_dir, paths, tmp_path):
    """Under fused_ops' fused linear cross-entropy the training forward builds no logits."""
    cfg = write_odm_config(tmp_path, paths)
    args = odm_args(model_dir, cfg, tmp_path / "out", max_steps=1, fast_kernels=[True] * 3)
    with pytest.raises(ConfigError, match="set fast_loss: cross_entropy, or reward_type"):
        accel.train(args)


def test_entropy_statistics_match_a_direct_computation(model_dir):
    from transformers import AutoModelForCausalLM

    from accel_odm.rewards import per_example_sums

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = torch.tensor([[-100, 5, 6, 7, 2], [-100, 8, 9, 2, -100]])
    logits = model(input_ids=ids).logits
    sums, tokens = per_example_sums(logits, labels, entropy=True)
    h = torch.distributions.Categorical(logits=logits.float()).entropy()  # (rows, seq)
    # position t predicts label t + 1: row 0 uses positions 0..3, row 1 positions 0..2
    assert tokens.tolist() == [4, 3]
    assert sums[1].tolist() == pytest.approx([h[0, :4].sum().item(), h[1, :3].sum().item()])
    assert sums[2, 0].item() == pytest.approx((h[0, :4] ** 2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("reward", ["entropy", "entropy_varentropy"])
def test_entropy_rewards_train_and_update(model_dir, paths, tmp_path, reward):
    cfg = write_odm_config(tmp_path, paths)
    result = accel.train(odm_args(model_dir, cfg, tmp_path / "out", max_steps=3, odm=[reward]))
    lines = odm_lines(tmp_path / "out")
    assert [line["step"] for line in lines] == [1, 2, 3]
    seen = [r for line in lines for r in line["rewards"] if r is not None]
    assert seen and all(0 < r < math.log(64) + 1e-6 for r in seen)  # entropies of 64 classes
    assert result.framework.get("odm").options.reward_type == "entropy" + (
        "3_varent1" if reward != "entropy" else ""
    )


def test_one_pass_loss_is_the_models_loss_and_gives_the_same_rewards(model_dir):
    """With transformers' default loss, loss and per-example sums come from one cross-entropy:
    the loss (and its gradient) equals ForCausalLMLoss, the sums equal the separate pass."""
    from transformers import AutoModelForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    from accel_odm.rewards import causal_lm_loss_and_sums, per_example_sums

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    labels = torch.tensor([[-100, 5, 6, 7, 2], [-100, 8, 9, 2, -100]])
    for items, entropy in ((None, False), (torch.tensor(11), False), (torch.tensor(11), True)):
        logits = model(input_ids=ids).logits
        expected = ForCausalLMLoss(logits, labels, 64, num_items_in_batch=items)
        (g_expected,) = torch.autograd.grad(expected, logits, retain_graph=True)
        loss, sums, tokens = causal_lm_loss_and_sums(logits, labels, items, entropy=entropy)
        (g_loss,) = torch.autograd.grad(loss, logits)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.allclose(g_loss, g_expected, atol=1e-7)
        separate, separate_tokens = per_example_sums(logits.detach(), labels, entropy=entropy)
        assert sums.shape == separate.shape
        for mine, theirs in zip(sums.tolist(), separate.tolist()):
            assert mine == pytest.approx(theirs, rel=1e-5)
        assert tokens.tolist() == separate_tokens.tolist() == [4, 3]

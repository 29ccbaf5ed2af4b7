"""odm under 2 processes (torchrun, gloo, padding-free): every rank holds the same weights
after every update, equal to one process training on the same global batches, and a resumed
2-process run makes the same decisions as the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_helpers import failure, torchrun, write_args
from odm_fixtures import odm_args, odm_lines, write_datasets, write_odm_config

import accel
from accel.testing import save_tiny_model

WORKER = Path(__file__).with_name("odm_ddp_worker.py")


def run_ddp(port: int, args: dict, record: Path, tmp_path: Path) -> list[dict]:
    record.mkdir(exist_ok=True)
    path = write_args(tmp_path / f"args-{port}.json", args)
    import os

    os.environ["RECORD_DIR"] = str(record)
    try:
        done = torchrun(port, str(WORKER), path)
    finally:
        del os.environ["RECORD_DIR"]
    assert done.returncode == 0, failure(done)
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_hold_identical_weights_and_resume_exactly(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    cfg = write_odm_config(tmp_path, write_datasets(tmp_path), gamma=0.2, eta=1.0)
    out = tmp_path / "ddp"
    common = {"max_steps": 4, "padding_free": ["huggingface"], "lr_scheduler_type": "constant"}
    args = odm_args(
        model,
        cfg,
        out,
        per_device_train_batch_size=3,
        save_strategy="steps",
        save_steps=2,
        **common,
    )
    ranks = run_ddp(29800, args, tmp_path / "rec1", tmp_path)
    assert [s for s, _ in ranks[0]["history"]] == [1, 2, 3, 4]
    assert ranks[0]["history"] == ranks[1]["history"]  # bit for bit, every update
    assert ranks[0]["counts"] == ranks[1]["counts"] and sum(ranks[0]["counts"]) == 4 * 6
    weights = [w for _, w in ranks[0]["history"]]
    assert weights[-1] != weights[0]

    # one process on the same global batches (2 ranks x 3 examples = 6 per step)
    single = accel.train(
        odm_args(model, cfg, tmp_path / "single", per_device_train_batch_size=6, **common)
    )
    reference = single.framework.get("odm").history
    assert [s for s, _ in reference] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ranks[0]["history"], reference):
        assert a == pytest.approx(b, rel=1e-4)
    assert list(single.framework.get("odm").sampler.counts) == ranks[0]["counts"]

    # interrupted after step 2: resume both ranks from checkpoint-2
    straight = odm_lines(out)
    shutil.rmtree(out / "checkpoint-4")
    resumed = run_ddp(29801, args, tmp_path / "rec2", tmp_path)
    assert resumed[0]["history"] == resumed[1]["history"]
    assert [s for s, _ in resumed[0]["history"]] == [3, 4]
    for (_, a), (_, b) in zip(resumed[0]["history"], ranks[0]["history"][2:]):
        assert a == pytest.approx(b, rel=1e-6)
    assert resumed[0]["counts"] == ranks[0]["counts"]
    again = odm_lines(out)
    assert [line["counts"] for line in again] == [line["counts"] for line in straight]

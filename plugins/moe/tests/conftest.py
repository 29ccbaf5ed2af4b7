"""Shared set-up of the moe tests: the Triton interpreter without a GPU (the root conftest sets
it too; here for running this folder alone), one intra-op thread, seeded RNG."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def moe_run_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Mixtral (4 experts, top-2) with the demo tokenizer, and 32 cipher examples."""
    import json

    from moe_models import save_moe_model

    from accel.trainer.demo import make_examples

    root = tmp_path_factory.mktemp("moe-run")
    save_moe_model(root / "model", "mixtral")
    rows = make_examples(32, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def run_args(moe_run_dir) -> dict:
    from accel.testing import cipher_run_args

    return cipher_run_args(
        moe_run_dir / "model",
        moe_run_dir / "train.jsonl",
        per_device_train_batch_size=8,
        learning_rate=1e-2,
    )

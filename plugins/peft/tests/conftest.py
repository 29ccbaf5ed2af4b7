"""Shared, session-wide assets: one tiny Llama (hidden 64, so GPTQ groups of 32 fit), its GPTQ
checkpoint written once by ``accel quantize``'s code path, and a cipher-task data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from accel.testing import save_tiny_model
    from accel.trainer.demo import make_examples

    root = tmp_path_factory.mktemp("peft")
    save_tiny_model(root / "llama", "llama", hidden_size=64, intermediate_size=128)
    rows = make_examples(32, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="session")
def gptq_dir(assets: Path) -> Path:
    from accel_peft.quantize import quantize

    return quantize(
        str(assets / "llama"),
        str(assets / "llama-gptq"),
        bits=4,
        group_size=32,
        calibration=str(assets / "train.jsonl"),
        max_examples=16,
    )

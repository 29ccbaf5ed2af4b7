"""Shared fixtures: a tiny model + tokenizer saved locally, small datasets, helper plugins."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with the demo's word-level tokenizer, saved to disk."""
    from accel.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def cipher_rows() -> list[dict[str, str]]:
    from accel.trainer.demo import make_examples

    return make_examples(64, seed=3)


@pytest.fixture(scope="session")
def train_jsonl(
    tmp_path_factory: pytest.TempPathFactory, cipher_rows: list[dict[str, str]]
) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in cipher_rows))
    return path


@pytest.fixture
def base_args(tiny_model_dir: Path, train_jsonl: Path, tmp_path: Path) -> dict:
    """Arguments of a short, fast training run on the cipher task."""
    from accel.testing import cipher_run_args

    return cipher_run_args(
        tiny_model_dir,
        train_jsonl,
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
    )

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

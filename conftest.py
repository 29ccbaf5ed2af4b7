"""Test-session rules shared by the core's and the plugins' tests.

``@pytest.mark.requires_cuda`` tests (e.g. the kernel tests' ``"cuda"`` device parameter) run
where a CUDA device is visible and are skipped elsewhere, so CI needs no GPU.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def _cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cuda") is not None and (reason := _cuda_missing()):
        pytest.skip(reason)

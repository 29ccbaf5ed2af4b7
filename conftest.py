"""Test-session rules shared by the core's and the plugins' tests.

Without a visible GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is
set here, before any test module imports triton (it is read when a kernel is defined).
Threads: accel's CPU defaults (:mod:`accel.threads`) are applied before torch is imported,
so the suite stays fast beside other work; subprocesses of the tests inherit them.
``@pytest.mark.requires_cuda`` tests (e.g. the kernel tests' ``"cuda"`` device parameter) run
where a CUDA device is visible and are skipped elsewhere, so CI needs no GPU.
"""

from __future__ import annotations

import functools
import os

from accel.threads import configure

configure()  # CPU thread defaults, before torch loads OpenMP (the user's OMP_* settings win)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.cache
def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA device"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cuda") is not None and (reason := _cuda_missing()):
        pytest.skip(reason)

"""Shared parametrisation of the kernel tests: device, implementation, dtype, seed.

Every kernel test that takes ``device`` runs on ``"cpu"`` and, where a GPU is visible, on
``"cuda"`` (``requires_cuda``, skipped elsewhere). On CPU the Triton kernels run under the
Triton interpreter (``TRITON_INTERPRET=1``, set here when no GPU is visible; it has to be set
before triton is imported); with a GPU they run compiled on CUDA tensors, and the CPU cases of
the Triton implementation are skipped unless ``TRITON_INTERPRET=1`` was set for the run.
Inputs are drawn on the CPU from fixed seeds and then moved, so both devices see the same
values (``randn_like`` of a device tensor, used for some upstream gradients, draws from that
device's generator instead).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny ops on a shared 2-core machine run several times faster on one intra-op thread than on
# two (the second thread mostly spins), and results do not depend on it.
torch.set_num_threads(1)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _skip_triton_on(device: torch.device) -> None:
    from accel_fused_ops.dispatch import triton_interpreting

    if device.type == "cpu" and not triton_interpreting():
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device the test's tensors live on."""
    return torch.device(request.param)


@pytest.fixture
def triton_device(device: torch.device) -> torch.device:
    """``device``, for tests that call a Triton kernel directly."""
    _skip_triton_on(device)
    return device


@pytest.fixture(params=["torch", "triton"])
def impl(request: pytest.FixtureRequest, device: torch.device, monkeypatch) -> str:
    """The implementation forced through ``ACCEL_KERNEL_IMPL``, on ``device``."""
    if request.param == "triton":
        _skip_triton_on(device)
    monkeypatch.setenv("ACCEL_KERNEL_IMPL", request.param)
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The input dtype: fp32 (reduction order differs) or bf16 (rounding differs)."""
    return request.param


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Each test starts from the same global RNG state, wherever it runs in the session."""
    torch.manual_seed(0)

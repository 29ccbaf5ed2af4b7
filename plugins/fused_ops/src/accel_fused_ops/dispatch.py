"""Choose between the Triton kernel and the PyTorch reference for one call.

Rule: Triton on CUDA tensors, PyTorch elsewhere. ``ACCEL_KERNEL_IMPL=triton|torch``
forces one side; forcing ``triton`` on CPU tensors is only possible under
``TRITON_INTERPRET=1`` (the Triton interpreter), which is how the kernels are tested
on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("triton", "torch")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_impl(tensor: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``tensor``."""
    forced = os.environ.get("ACCEL_KERNEL_IMPL", "").strip().lower()
    if forced and forced not in IMPLS:
        raise ValueError(
            f"ACCEL_KERNEL_IMPL={forced!r} is not valid; expected one of {IMPLS} or unset"
        )
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if tensor.is_cuda or triton_interpreting():
            return "triton"
        raise RuntimeError(
            "ACCEL_KERNEL_IMPL=triton was set for a CPU tensor; Triton runs on CPU only "
            "under TRITON_INTERPRET=1 (set it before importing accel_fused_ops)"
        )
    return "triton" if tensor.is_cuda else "torch"

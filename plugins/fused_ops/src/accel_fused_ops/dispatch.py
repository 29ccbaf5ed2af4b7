"""Helpers every op shares: which implementation runs a call, and what the kernels accept.

Rule: Triton on CUDA tensors, PyTorch elsewhere. ``ACCEL_KERNEL_IMPL=triton|torch``
forces one side; forcing ``triton`` on CPU tensors is only possible under
``TRITON_INTERPRET=1`` (the Triton interpreter), which is how the kernels are tested
on machines without a GPU. Inputs the Triton kernels do not handle (a dtype outside
:data:`TRITON_DTYPES`) fall back to the PyTorch path of the same op (:func:`pick_impl`), so a
forced ``triton`` never fails on, say, fp64.
"""

from __future__ import annotations

import torch

from accel.api import choose_impl as shared_choose_impl
from accel.api import triton_interpreting as triton_interpreting

#: dtypes the Triton kernels load and store (they compute in fp32 inside)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose_impl(tensor: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``tensor``."""
    return shared_choose_impl(tensor, "accel_fused_ops")


def pick_impl(main: torch.Tensor, *others: torch.Tensor | None) -> str:
    """:func:`choose_impl` for ``main``, then ``"torch"`` when any given tensor has a dtype
    the Triton kernels do not handle (the "Triton unless unsupported" rule of every op)."""
    impl = choose_impl(main)
    tensors = (main, *(t for t in others if t is not None))
    if impl == "triton" and any(t.dtype not in TRITON_DTYPES for t in tensors):
        return "torch"
    return impl


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (what the kernels index), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(N, C)`` with unit column stride: a view whenever possible (e.g. a slice of a
    fused gate/up projection output), a copy otherwise."""
    return last_dim_contiguous(t.reshape(-1, t.shape[-1]))

"""A stand-in CUDA device: the public ops run their CUDA path and every launch compiles.

Six stand-ins, active together inside :func:`stand_in_gpu`:

* a Triton driver (a ``CudaDriver`` that loads no libcuda) reporting the target GPU, so a
  ``kernel[grid](...)`` launch compiles for ``sm_XX`` with the ptxas bundled in the wheel;
* fake CUDA tensors (``FakeTensorMode``): ``x.is_cuda`` is true, so the ops take the
  branches they take on a GPU, and shapes of any size cost no memory;
* ``torch.cuda``'s device queries (capability, SM count, shared memory), answered for the
  target, so launch choices that depend on the device see the real values;
* the few ``torch.Tensor`` methods whose Python binding needs a CUDA build (indexing,
  ``copy_``, ``contiguous``, ``to``): see :mod:`tensor_methods`;
* host syncs: fake tensors hold no values, so ``torch.compiler.is_compiling()`` is true and
  the ops skip their value checks as they do under ``torch.compile``;
* autograd: fake CUDA tensors cannot enter torch's autograd graph on a CPU-only build, so
  ``Function.apply`` runs ``forward`` with a plain context and :func:`run_backward` later
  calls each Function's own ``backward`` with output-shaped gradients.

Every launch is turned into ``warmup=True`` (compile, do not run) and recorded as a
:class:`Launch`, with the ptxas log of its compile.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.jit import JITFunction, MockTensor

from .tensor_methods import patched_methods

#: streaming multiprocessors of the flagship part of each target (A100, H100 SXM, B200)
SM_COUNT = {80: 108, 90: 132, 100: 148}
#: opt-in shared memory per block, bytes (CUDA programming guide, compute capabilities table)
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}


class CompileFailed(RuntimeError):
    """A kernel launch whose compile raised (Triton front end, LLVM or ptxas)."""

    def __init__(self, kernel: str, error: BaseException) -> None:
        super().__init__(f"{kernel}: {type(error).__name__}: {error}")
        self.kernel = kernel


@dataclass
class Launch:
    """One launch the op made: which kernel, with which meta-parameters, compiled to what."""

    kernel: str
    meta: dict[str, Any]
    compiled: Any  # triton CompiledKernel
    ptxas_log: str


class StandInDriver(CudaDriver):
    """A CUDA driver for a GPU that is not there; enough for Triton to compile for it."""

    def __init__(self, capability: int) -> None:  # no CudaDriver.__init__: it loads libcuda
        self.capability = capability

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self) -> int:
        # One device id per target keeps Triton's per-device kernel caches apart.
        return self.capability

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.capability, 10)


def _device_properties(capability: int) -> SimpleNamespace:
    major, minor = divmod(capability, 10)
    return SimpleNamespace(
        name=f"stand-in sm_{capability}",
        major=major,
        minor=minor,
        multi_processor_count=SM_COUNT.get(capability, 108),
        total_memory=80 * 2**30,
        shared_memory_per_block=48 * 1024,
        shared_memory_per_block_optin=SHARED_PER_BLOCK.get(capability, 99 * 1024),
        shared_memory_per_multiprocessor=SHARED_PER_BLOCK.get(capability, 99 * 1024) + 1024,
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        warp_size=32,
        L2_cache_size=50 * 2**20,
    )


@dataclass
class _Context:
    """What an autograd Function's forward and backward use of ``ctx``."""

    needs_input_grad: tuple[bool, ...]
    saved: tuple[Any, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved = tensors

    @property
    def saved_tensors(self) -> tuple[Any, ...]:
        return self.saved

    def mark_non_differentiable(self, *args: Any) -> None:
        pass

    def mark_dirty(self, *args: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


class StandIn:
    """The state of one :func:`stand_in_gpu` block: its launches and its autograd tape."""

    def __init__(self, capability: int) -> None:
        self.capability = capability
        self.launches: list[Launch] = []
        self.tape: list[tuple[type, _Context, Any]] = []
        self._logs: dict[str, str] = {}  # kernel hash -> ptxas log of its compile

    def cuda(self, shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised fake CUDA tensor (call inside the block)."""
        return torch.empty(shape, dtype=dtype, device="cuda")

    def backward(self) -> None:
        """Run the backward of every Function applied so far, last first, as autograd would,
        with uninitialised gradients shaped like each output."""
        while self.tape:
            cls, ctx, outputs = self.tape.pop()
            outs = outputs if isinstance(outputs, tuple) else (outputs,)
            grads = [
                torch.empty_like(o)
                if isinstance(o, torch.Tensor) and o.is_floating_point()
                else None
                for o in outs
            ]
            cls.backward(ctx, *grads)

    # -- the patched entry points
    def _apply(self, cls: type, *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()
        needs = tuple(grad and isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)
        ctx = _Context(needs)
        outputs = cls.forward(ctx, *args, **kwargs)
        self.tape.append((cls, ctx, outputs))
        return outputs

    def _run(self, original, fn: JITFunction, *args: Any, grid, warmup, **kwargs: Any) -> Any:
        def mocked(a: Any) -> Any:
            return MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a

        args = tuple(mocked(a) for a in args)
        kwargs = {k: mocked(v) for k, v in kwargs.items()}
        name = fn.fn.__name__
        log = io.StringIO()
        with unset_fake_temporarily(), contextlib.redirect_stdout(log):
            try:
                kernel = original(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as error:
                raise CompileFailed(name, error) from error
        if log.getvalue():
            self._logs[kernel.hash] = log.getvalue()
        meta = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int)) and k.isupper()}
        if "num_stages" in kwargs:
            meta["stages"] = kwargs["num_stages"]
        self.launches.append(Launch(name, meta, kernel, self._logs.get(kernel.hash, "")))
        return kernel


@contextlib.contextmanager
def stand_in_gpu(capability: int) -> Iterator[StandIn]:
    """Inside this block the process looks like it has one ``sm_<capability>`` GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET before importing triton to compile kernels")
    state = StandIn(capability)
    props = _device_properties(capability)
    original_run = JITFunction.run

    def run(fn, *args, grid, warmup, **kwargs):
        return state._run(original_run, fn, *args, grid=grid, warmup=warmup, **kwargs)

    def apply(cls, *args, **kwargs):
        return state._apply(cls, *args, **kwargs)

    driver = triton.runtime.driver
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", run))
        stack.enter_context(mock.patch.object(torch.autograd.Function, "apply", classmethod(apply)))
        cuda = torch.cuda
        stack.enter_context(mock.patch.object(cuda, "get_device_properties", lambda *a: props))
        stack.enter_context(
            mock.patch.object(cuda, "get_device_capability", lambda *a: divmod(capability, 10))
        )
        stack.enter_context(mock.patch.object(cuda, "current_device", lambda: 0))
        stack.enter_context(mock.patch.object(cuda, "device_count", lambda: 1))
        stack.enter_context(mock.patch.object(triton.knobs.nvidia, "dump_ptxas_log", True))
        # Fake tensors hold no values: host syncs (label range checks, counting ignored rows)
        # take the path the ops take under torch.compile, which skips them.
        stack.enter_context(mock.patch.object(torch.compiler, "is_compiling", lambda: True))
        previous = driver._active  # not .active: that would create the real (libcuda) driver
        driver.set_active(StandInDriver(capability))
        stack.callback(setattr, driver, "_active", previous)
        stack.enter_context(patched_methods())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        yield state

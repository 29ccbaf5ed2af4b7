"""Small rules the core and the plugins share, each written once: atomic writes, the cache
folder, notes on exceptions, and the choice between a Triton kernel and its PyTorch path.

Plugins reach these through :mod:`accel.api`. Nothing here imports torch: the kernel choice
takes the tensor and reads only ``is_cuda``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

#: the kernel implementations ``ACCEL_KERNEL_IMPL`` may force
KERNEL_IMPLS = ("triton", "torch")


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a
    half-written one: the data goes to a temporary file in the same folder, then replaces
    ``path`` (``os.replace`` is atomic on one filesystem)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode(encoding) if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(raw)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_dir(*parts: str) -> Path:
    """``$ACCEL_CACHE`` (default ``~/.cache/accel``), joined with ``parts``; not created."""
    base = os.environ.get("ACCEL_CACHE") or Path.home() / ".cache" / "accel"
    return Path(base).joinpath(*parts)


def add_note(err: BaseException, text: str) -> None:
    """``err.add_note(text)`` (Python 3.11+; on 3.10 the note is kept in ``__notes__``)."""
    if hasattr(err, "add_note"):
        err.add_note(text)
    else:
        err.__notes__ = [*getattr(err, "__notes__", []), text]  # type: ignore[attr-defined]


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``: kernels on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_impl(tensor: Any, package: str = "the kernels") -> str:
    """``"triton"`` for a CUDA tensor, ``"torch"`` elsewhere; ``ACCEL_KERNEL_IMPL`` forces one
    (``triton`` on a CPU tensor only under the Triton interpreter). ``package`` names the
    kernel package in the error (it reads ``TRITON_INTERPRET`` when Triton is imported)."""
    forced = os.environ.get("ACCEL_KERNEL_IMPL", "").strip().lower()
    if forced and forced not in KERNEL_IMPLS:
        raise ValueError(
            f"ACCEL_KERNEL_IMPL={forced!r} is not valid; expected one of {KERNEL_IMPLS} or unset"
        )
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if tensor.is_cuda or triton_interpreting():
            return "triton"
        raise RuntimeError(
            "ACCEL_KERNEL_IMPL=triton was set for a CPU tensor; Triton runs on CPU only "
            f"under TRITON_INTERPRET=1 (set it before importing {package})"
        )
    return "triton" if tensor.is_cuda else "torch"

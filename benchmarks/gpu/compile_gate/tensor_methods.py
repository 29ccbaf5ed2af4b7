"""Tensor methods for fake CUDA tensors on a CPU-only torch build.

A few of ``torch.Tensor``'s Python bindings (indexing, ``copy_``, ``contiguous`` of a strided
tensor, ``to("cuda")``) open a CUDA device guard before they dispatch, and a CPU-only build
has no CUDA guard to open: they raise "PyTorch is not linked with support for cuda devices"
although the aten ops beneath them run on fake CUDA tensors. :func:`patched_methods` gives
the stand-in GPU versions of them that go straight to those aten ops, with the semantics of
the originals (basic indexing makes views, tensor indices go through ``aten.index``), for
CUDA tensors only; every other tensor keeps the original method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

aten = torch.ops.aten

_ORIGINAL = {
    name: getattr(torch.Tensor, name)
    for name in ("__getitem__", "__setitem__", "copy_", "contiguous", "to", "cuda")
}


def _as_tuple(index: Any) -> tuple[Any, ...]:
    return index if isinstance(index, tuple) else (index,)


def _basic(x: torch.Tensor, index: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Apply the ints, slices, ``None`` and ``...`` of ``index`` as views, as torch does; the
    tensor (or list) indices come back aligned with the dimensions of that view."""
    items = list(_as_tuple(index))
    consumed = sum(
        (i.ndim if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1)
        for i in items
        if i is not None and i is not Ellipsis
    )
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (x.ndim - consumed)
    view, dim, tensors = x, 0, []
    for item in items:
        if item is None:
            view = aten.unsqueeze.default(view, dim)
            tensors.append(None)
            dim += 1
        elif isinstance(item, bool):
            raise TypeError("a bool index is not supported for a stand-in CUDA tensor")
        elif isinstance(item, (list, torch.Tensor)):
            tensor = torch.as_tensor(item, device=x.device) if isinstance(item, list) else item
            if tensor.dtype == torch.bool:
                tensors += [tensor] + [None] * (max(tensor.ndim, 1) - 1)
                dim += max(tensor.ndim, 1)
            else:
                tensors.append(tensor)
                dim += 1
        elif isinstance(item, int) or hasattr(item, "__index__"):
            view = aten.select.int(view, dim, int(item))
        elif isinstance(item, slice):
            step = 1 if item.step is None else int(item.step)
            view = aten.slice.Tensor(view, dim, item.start, item.stop, step)
            tensors.append(None)
            dim += 1
        else:
            raise TypeError(f"unsupported index {item!r} for a stand-in CUDA tensor")
    return view, tensors


def _advanced(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
    """The ``aten.index`` index list, or None when the index was basic only."""
    if not any(t is not None for t in tensors):
        return None
    last = max(i for i, t in enumerate(tensors) if t is not None)
    return tensors[: last + 1]


def _getitem(self: torch.Tensor, index: Any) -> torch.Tensor:
    if not self.is_cuda:
        return _ORIGINAL["__getitem__"](self, index)
    view, tensors = _basic(self, index)
    indices = _advanced(tensors)
    return view if indices is None else aten.index.Tensor(view, indices)


def _setitem(self: torch.Tensor, index: Any, value: Any) -> None:
    if not self.is_cuda:
        return _ORIGINAL["__setitem__"](self, index, value)
    view, tensors = _basic(self, index)
    indices = _advanced(tensors)
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=self.dtype, device=self.device)
    if indices is None:
        aten.copy_.default(view, value)
    else:
        aten.index_put_.default(view, indices, value.to(self.dtype))
    return None


def _copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    if not (self.is_cuda or src.is_cuda):
        return _ORIGINAL["copy_"](self, src, non_blocking)
    return aten.copy_.default(self, src, non_blocking)


def _contiguous(
    self: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    if not self.is_cuda or self.is_contiguous(memory_format=memory_format):
        return _ORIGINAL["contiguous"](self, memory_format=memory_format)
    return aten.clone.default(self, memory_format=memory_format)


def _to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or device.type != "cuda":
        return _ORIGINAL["to"](self, *args, copy=copy, **kwargs)
    device = torch.device("cuda", device.index or 0)
    dtype = dtype or self.dtype
    keeps_layout = memory_format in (None, torch.preserve_format)
    if not copy and self.device == device and self.dtype == dtype and keeps_layout:
        return self
    return aten._to_copy.default(
        self, dtype=dtype, device=device, non_blocking=non_blocking, memory_format=memory_format
    )


def _cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **_: Any):
    return _to(self, "cuda" if device is None else device, non_blocking=non_blocking)


@contextlib.contextmanager
def patched_methods() -> Iterator[None]:
    """While active, the methods above replace torch's for CUDA tensors."""
    replacements = {
        "__getitem__": _getitem,
        "__setitem__": _setitem,
        "copy_": _copy,
        "contiguous": _contiguous,
        "to": _to,
        "cuda": _cuda,
    }
    with contextlib.ExitStack() as stack:
        for name, method in replacements.items():
            stack.enter_context(mock.patch.object(torch.Tensor, name, method))
        yield

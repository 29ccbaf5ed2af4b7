"""Fused RoPE for transformers attention modules, through their modeling file's function.

Every attention ``forward`` calls the module-level ``apply_rotary_pos_emb`` of its modeling
file (``transformers.models.llama.modeling_llama.apply_rotary_pos_emb``, ...). transformers
5 marks these classes with ``use_kernelized_func``, but that decorator only acts with the
optional ``kernels`` package and still leaves the forward calling the module global, so there
is no per-instance hook. The fused function is therefore put into the modeling file itself:
**while patched, every model of that file in the process uses it**, not only the patched one.
Each patched attention module holds one reference; the original function comes back when the
last reference is released (``AppliedPatches.revert`` of the last model using it).
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .kernels.rope import apply_rotary_pos_emb as fused_apply_rotary_pos_emb

FUNCTION = "apply_rotary_pos_emb"
_LOCK = threading.Lock()


@dataclass
class _Entry:
    original: Callable[..., Any]
    references: int = 0


#: modeling module name -> the function it had before the first patch, and how many
#: attention modules currently rely on the fused one
_ACTIVE: dict[str, _Entry] = {}


def _unwrapped_code(function: Any) -> Any:
    return getattr(inspect.unwrap(function), "__code__", None)


def rope_modeling_module(attention: Any) -> ModuleType | None:
    """The modeling module whose ``apply_rotary_pos_emb`` the attention forward calls, or None."""
    code = _unwrapped_code(type(attention).forward)
    if code is None or FUNCTION not in code.co_names:
        return None
    module = sys.modules.get(type(attention).__module__)
    if module is None or not callable(getattr(module, FUNCTION, None)):
        return None
    return module


def is_standard_rope(function: Any) -> bool:
    """True when ``function`` is Llama's ``apply_rotary_pos_emb`` (the fused op's contract),
    compared by bytecode; transformers copies that function into each modeling file."""
    from transformers.models.llama import modeling_llama

    reference = _unwrapped_code(_original(modeling_llama))
    code = _unwrapped_code(function)
    return (
        code is not None
        and reference is not None
        and (code.co_code, code.co_names, code.co_varnames)
        == (reference.co_code, reference.co_names, reference.co_varnames)
    )


def _original(module: ModuleType) -> Any:
    entry = _ACTIVE.get(module.__name__)
    return entry.original if entry is not None else getattr(module, FUNCTION)


def original_function(module: ModuleType) -> Any:
    """The function the modeling module had before any fused patch."""
    with _LOCK:
        return _original(module)


def acquire(module: ModuleType) -> Callable[[], None]:
    """Put the fused function into ``module`` (first reference) and return its release."""
    with _LOCK:
        entry = _ACTIVE.get(module.__name__)
        if entry is None:
            entry = _ACTIVE[module.__name__] = _Entry(getattr(module, FUNCTION))
            setattr(module, FUNCTION, fused_apply_rotary_pos_emb)
        entry.references += 1
    released = False

    def release() -> None:
        nonlocal released
        with _LOCK:
            if released:
                return
            released = True
            entry.references -= 1
            if entry.references == 0:
                del _ACTIVE[module.__name__]
                # only undo our own change: if someone replaced the function since, keep theirs
                if getattr(module, FUNCTION) is fused_apply_rotary_pos_emb:
                    setattr(module, FUNCTION, entry.original)

    return release


def references(module: ModuleType) -> int:
    """How many patched attention modules currently hold ``module``'s fused function."""
    with _LOCK:
        entry = _ACTIVE.get(module.__name__)
        return entry.references if entry is not None else 0

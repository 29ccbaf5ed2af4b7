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

from accel import PatchError, PatchRule

from ..kernels.rope import apply_rotary_pos_emb as fused_apply_rotary_pos_emb
from ..support import supported_types

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


def _code_key(function: Any) -> tuple[Any, ...] | None:
    code = _unwrapped_code(function)
    return None if code is None else (code.co_code, code.co_names, code.co_varnames)


def is_standard_rope(function: Any) -> bool:
    """True when ``function`` is Llama's ``apply_rotary_pos_emb`` or Phi3's partial-rotary one
    (both are the fused op's contract), compared by bytecode; transformers copies these
    functions into each modeling file."""
    from transformers.models.llama import modeling_llama
    from transformers.models.phi3 import modeling_phi3

    references = {_code_key(_original(m)) for m in (modeling_llama, modeling_phi3)}
    key = _code_key(function)
    return key is not None and key in references


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


def rules(settings: Any, model: Any) -> list[PatchRule]:
    """The ``rotary_embedding`` rule; refuses (PatchError) a modeling file whose
    ``apply_rotary_pos_emb`` is not the standard one."""
    checked: set[str] = set()
    for module in model.modules():
        modeling = rope_modeling_module(module)
        if modeling is None or modeling.__name__ in checked:
            continue
        if not is_standard_rope(original_function(modeling)):
            raise PatchError(
                f"fast_rope_embeddings: {modeling.__name__}.apply_rotary_pos_emb is not the "
                "standard rotary embedding in this transformers version; switch it off"
            )
        checked.add(modeling.__name__)
    return [
        PatchRule(
            name="rotary_embedding",
            feature="fast_rope_embeddings",
            model_types=supported_types("fast_rope_embeddings"),
            match=lambda m: rope_modeling_module(m) is not None,
            apply=lambda m: acquire(rope_modeling_module(m)),
        )
    ]

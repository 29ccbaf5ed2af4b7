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

import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from accel.api import PatchError, PatchRule, same_code

from ..kernels.rope import apply_rotary_pos_emb as fused_apply_rotary_pos_emb
from ..support import supported_types

FUNCTION = "apply_rotary_pos_emb"
_LOCK = threading.Lock()


@dataclass
class _Entry:
    original: Callable[..., Any]
    #: the fused function put in its place
    replacement: Callable[..., Any]
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


# GPT-OSS's form, as transformers writes it (compared by bytecode, never called): cos/sin of
# half the head width, the two halves rotated explicitly.
def _half_width_rotate(
    x,
    cos,
    sin,
):
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    first_ = first_half * cos - second_half * sin
    second_ = second_half * cos + first_half * sin
    return torch.cat((first_, second_), dim=-1)


def _half_width_apply(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = _apply_rotary_emb(q, cos, sin)  # noqa: F821 - the modeling file's global
    k_embed = _apply_rotary_emb(k, cos, sin)  # noqa: F821
    return q_embed, k_embed


def fused_half_width_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS's ``apply_rotary_pos_emb`` through the fused op: with ``c = cos`` of width D/2,
    ``x1 * c - x2 * s, x2 * c + x1 * s`` is the rotate_half rotation with ``cat(c, c)``."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


# OLMo's form (compared by bytecode, never called): Llama's rotation computed in the promoted
# dtype of q/k and cos/sin, then cast back to q's and k's dtypes.
def _cast_back_apply(q, k, cos, sin, unsqueeze_dim=1):
    q_type, k_type = q.dtype, k.dtype
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)  # noqa: F821 - the modeling file's global
    k_embed = (k * cos) + (rotate_half(k) * sin)  # noqa: F821
    return q_embed.to(q_type), k_embed.to(k_type)


def fused_cast_back_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMo's ``apply_rotary_pos_emb`` through the fused op: the same rotation, cast back."""
    q_embed, k_embed = fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


@dataclass(frozen=True)
class RopeForm:
    """One way transformers writes ``apply_rotary_pos_emb``, and the fused function for it.

    A reference is a function (a frozen copy in this file, compared by code shape, never
    called) or ``"module:name"`` of transformers (the function that modeling file had before
    any fused patch, for forms transformers copies unchanged into other files)."""

    name: str
    #: the forms of ``apply_rotary_pos_emb`` itself (any of them)
    known: tuple[Callable[..., Any] | str, ...]
    #: the other globals of the modeling file the form calls -> their known form
    helpers: tuple[tuple[str, Callable[..., Any] | str], ...]
    fused: Callable[..., Any]


_LLAMA = "transformers.models.llama.modeling_llama"
FORMS: tuple[RopeForm, ...] = (
    # Llama's and Phi3's (partial rotary: rotary_dim < head_dim) rotate_half form
    RopeForm(
        "rotate_half",
        known=(f"{_LLAMA}:{FUNCTION}", f"transformers.models.phi3.modeling_phi3:{FUNCTION}"),
        helpers=(),
        fused=fused_apply_rotary_pos_emb,
    ),
    # GPT-OSS: half-width cos/sin, both halves rotated explicitly
    RopeForm(
        "half_width",
        known=(_half_width_apply,),
        helpers=(("_apply_rotary_emb", _half_width_rotate),),
        fused=fused_half_width_rope,
    ),
    # OLMo: Llama's rotation in the promoted dtype, cast back to q's and k's
    RopeForm(
        "cast_back",
        known=(_cast_back_apply,),
        helpers=(("rotate_half", f"{_LLAMA}:rotate_half"),),
        fused=fused_cast_back_rope,
    ),
)


def _reference(ref: Callable[..., Any] | str) -> Any:
    if callable(ref):
        return ref
    module_name, name = ref.split(":")
    module = importlib.import_module(module_name)
    return _original(module) if name == FUNCTION else getattr(module, name)


def form_of(modeling: ModuleType) -> RopeForm | None:
    """The form of ``modeling``'s original ``apply_rotary_pos_emb`` (code shapes of it and of
    its helpers), or None when it is none of :data:`FORMS`."""
    original = _original(modeling)
    for form in FORMS:
        if not any(same_code(original, _reference(k)) for k in form.known):
            continue
        if all(same_code(getattr(modeling, n, None), _reference(r)) for n, r in form.helpers):
            return form
    return None


def rope_replacement(modeling: ModuleType) -> Callable[..., Any] | None:
    """The fused function for ``modeling``'s original ``apply_rotary_pos_emb`` (its form's
    ``fused``), or None for any other function."""
    form = form_of(modeling)
    return None if form is None else form.fused


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
            replacement = rope_replacement(module)
            if replacement is None:
                raise PatchError(
                    f"fast_rope_embeddings: {module.__name__}.{FUNCTION} is not a rotary "
                    "embedding the fused op reproduces"
                )
            entry = _Entry(getattr(module, FUNCTION), replacement)
            _ACTIVE[module.__name__] = entry
            setattr(module, FUNCTION, replacement)
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
                if getattr(module, FUNCTION) is entry.replacement:
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
        if rope_replacement(modeling) is None:
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

"""Is a function of transformers still the form a patch replaces?

A patch that swaps a forward (or a modeling file's helper) for a fused one is only right while
the original computes what the patch assumes. Names alone do not say that, so patches compare
the *code shape*: the bytecode, the names and local variables it uses, every constant (typed,
so ``1``, ``1.0`` and ``True`` differ; strings included, since an argument such as
``approximate="tanh"`` changes meaning), the defaults of its arguments, and the same of every
nested function or comprehension. Only the docstring is left out. Two functions with the same
shape compute the same thing given the same globals; any edit upstream, even one constant
(``dim=-1`` to ``dim=1``), gives another shape, and the patch refuses instead of guessing.
"""

from __future__ import annotations

import dis
import inspect
from types import CodeType
from typing import Any

__all__ = ["code_shape", "same_code", "shape_difference"]

CodeShape = tuple[Any, ...]


def _constant(value: Any) -> Any:
    """A constant with its type, recursively (``1 == 1.0 == True`` in Python)."""
    if isinstance(value, CodeType):
        return ("code", _code(value))
    if isinstance(value, (tuple, frozenset)):
        items = sorted(map(repr, value)) if isinstance(value, frozenset) else value
        return (type(value).__name__, tuple(_constant(v) for v in items))
    return (type(value).__name__, repr(value))


def _code(code: CodeType) -> CodeShape:
    """Each instruction with its resolved argument (the constant itself, not its index, so a
    docstring, which no instruction loads, drops out), and the variables and arguments."""
    instructions = tuple(
        (i.opname, _constant(i.argval)) for i in dis.get_instructions(code) if i.opname != "RESUME"
    )
    return (
        instructions,
        code.co_varnames,
        code.co_freevars,
        code.co_argcount,
        code.co_kwonlyargcount,
    )


def code_shape(function: Any) -> CodeShape | None:
    """The shape of ``function`` (unwrapped through ``functools.wraps``), or None for an
    object without Python code (a builtin, a C extension, ``None``)."""
    function = inspect.unwrap(function) if callable(function) else function
    code = getattr(function, "__code__", None)
    if not isinstance(code, CodeType):
        return None
    defaults = getattr(function, "__defaults__", None) or ()
    kwdefaults = getattr(function, "__kwdefaults__", None) or {}
    return (
        _code(code),
        tuple(_constant(d) for d in defaults),
        tuple(sorted((k, _constant(v)) for k, v in kwdefaults.items())),
    )


def same_code(found: Any, known: Any) -> bool:
    """Whether ``found`` has the code shape of ``known`` (False when either has no code)."""
    a, b = code_shape(found), code_shape(known)
    return a is not None and a == b


_PARTS = ("instructions", "local variables", "closure variables", "argument count",
          "keyword-only argument count")  # fmt: skip


def shape_difference(found: Any, known: Any) -> str | None:
    """What differs between the two shapes, for an error message; None if they are equal."""
    a, b = code_shape(found), code_shape(known)
    if a == b and a is not None:
        return None
    if a is None or b is None:
        return "no Python code to compare"
    for part, x, y in zip(_PARTS, a[0], b[0]):
        if x == y:
            continue
        if part == "instructions":
            at = next((n for n, (i, j) in enumerate(zip(x, y)) if i != j), min(len(x), len(y)))
            return f"instruction {at}: {_show(x, at)} where the known form has {_show(y, at)}"
        if part in ("local variables", "closure variables"):
            return f"{part} differ: {sorted(set(x) ^ set(y))[:5]}"
        return f"{part} differ"
    return "argument defaults differ" if a[1] != b[1] else "keyword-only defaults differ"


def _show(instructions: tuple[Any, ...], at: int) -> str:
    if at >= len(instructions):
        return "the end"
    opname, (kind, value) = instructions[at]
    return f"{opname} {value}" if kind != "NoneType" else opname

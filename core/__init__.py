"""accel: plugin-based acceleration for fine-tuning LLMs with Hugging Face.

Imports are lazy so that ``import accel`` (and ``accel --help``) stay fast: torch,
transformers and the trainer load only when their names are used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .api import _EXPORTS as _PLUGIN_API  # a table of names; loads nothing
from .version import __version__

#: the library's names: the plugin API's contract and errors (``accel.api``), plus the
#: entry points of a user of the library
_EXPORTS = {
    **{
        name: module
        for name, module in _PLUGIN_API.items()
        if module in ("plugin", "hookspecs", "flags", "errors")
    },
    "AccelerationFramework": "framework",
    "PatchRule": "patching",
    "AppliedPatches": "patching",
    "apply_patches": "patching",
    "train": "trainer.run",
    "plot_runs": "plots",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")

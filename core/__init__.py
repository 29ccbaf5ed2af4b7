"""accel: plugin-based acceleration for fine-tuning LLMs with Hugging Face.

Imports are lazy so that ``import accel`` (and ``accel --help``) stay fast: torch,
transformers and the trainer load only when their names are used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

_EXPORTS = {
    "AccelerationPlugin": "plugin",
    "hook": "hookspecs",
    "Flag": "flags",
    "AccelerationFramework": "framework",
    "PatchRule": "patching",
    "AppliedPatches": "patching",
    "apply_patches": "patching",
    "AccelError": "errors",
    "ConfigError": "errors",
    "PatchError": "errors",
    "PluginConflictError": "errors",
    "PluginNotInstalledError": "errors",
    "PluginRequirementError": "errors",
    "UnsupportedModelError": "errors",
    "train": "trainer.run",
    "plot_runs": "plots",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'accel' has no attribute {name!r}")

"""The plugin API: everything a plugin may import from the core, and nothing else.

A plugin imports from ``accel.api`` only (``from accel.api import AccelerationPlugin, hook``);
every other core module is private and may change between core versions
(``tests/test_api_boundary.py`` parses every plugin's sources and refuses any other import
of the core). The top-level ``accel`` names are for users of the library
(``accel.train``, ``accel.AccelerationFramework``), not the plugin surface.

Names load lazily, like ``import accel``: a plugin module that imports ``accel.api`` at its
top stays cheap for ``accel --help`` and ``accel plugins``, and the trainer's helpers (which
import torch and transformers) load when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name -> the core module (relative to ``accel``) that defines it
_EXPORTS: dict[str, str] = {
    # the plugin contract
    "AccelerationPlugin": "plugin",
    "BaseLayer": "plugin",
    "hook": "hookspecs",
    "Flag": "flags",
    # errors a user can act on
    "AccelError": "errors",
    "ConfigError": "errors",
    "PatchError": "errors",
    "PluginConflictError": "errors",
    "PluginNotInstalledError": "errors",
    "PluginRequirementError": "errors",
    "UnsupportedModelError": "errors",
    # patch rules and what they patch with
    "PatchRule": "patching",
    "bind": "patching",
    "set_attribute": "patching",
    "model_type_of": "patching",
    # support tables and the generated README blocks
    "Support": "support",
    "Supported": "support",
    "Unsupported": "support",
    "GeneratedBlock": "support",
    "cell": "support",
    # shared helpers
    "write_atomic": "helpers",
    "cache_dir": "helpers",
    "add_note": "helpers",
    "choose_impl": "helpers",
    "triton_interpreting": "helpers",
    "KERNEL_IMPLS": "helpers",
    # model loading, for plugins that own it or check a model folder
    "default_loader": "trainer.loading",
    "load_model_config": "trainer.loading",
    "check_model_source": "trainer.loading",
    # distributed training and checkpoints
    "check_load_time_sharding_checkpoints": "trainer.distributed",
    "export_checkpoint": "trainer.sharded_checkpoint",
    # the datasets of a data config, for the data mixer
    "DataMix": "trainer.datamix",
    "mix_of": "trainer.datamix",
}

#: core modules whose whole ``__all__`` is part of the API
_WHOLE_MODULES = ("codeshape",)


def _whole_module_names() -> dict[str, str]:
    names = {}
    for module in _WHOLE_MODULES:
        try:
            found = import_module(f"accel.{module}")
        except ModuleNotFoundError:
            continue
        names.update(dict.fromkeys(getattr(found, "__all__", ()), module))
    return names


def exports() -> dict[str, str]:
    """Every public name of the API and the core module that defines it."""
    return {**_EXPORTS, **_whole_module_names()}


__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _whole_module_names().get(name)
    if module is None:
        raise AttributeError(f"module 'accel.api' has no attribute {name!r} (see accel.api)")
    return getattr(import_module(f"accel.{module}"), name)


def __dir__() -> list[str]:
    return sorted(exports())

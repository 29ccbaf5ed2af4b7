"""Errors a user can act on. The CLI prints their message and exits non-zero, with no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AccelError(Exception):
    """Base class of every error caused by user input or environment (not by a bug)."""


class ConfigError(AccelError):
    """A configuration key, value or flag is wrong."""


class PluginNotInstalledError(AccelError):
    """A requested feature belongs to a plugin that is not installed."""


class PluginConflictError(AccelError):
    """Active plugins cannot run together (two owners of one stage, declared conflicts, cycles)."""


class PluginRequirementError(AccelError):
    """A plugin needs another plugin, a package or a core version that is not there."""


class UnsupportedModelError(AccelError):
    """A plugin was asked to work on a model architecture it does not support."""


class PatchError(AccelError):
    """A requested feature patched nothing in the model, or a patch could not be applied."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""

"""Errors a user can act on. The CLI prints their message and exits non-zero, with no traceback."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


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


class ErrorList(ConfigError):
    """Several independent problems found by the cheap checks of one run, reported together
    (one ``accel: error:`` line each) so that a user fixes them in one go."""

    def __init__(self, errors: list[AccelError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class Problems:
    """Runs checks that do not depend on each other and keeps every :class:`AccelError` they
    raise; :meth:`raise_any` then raises the one problem, or all of them as an
    :class:`ErrorList`."""

    def __init__(self) -> None:
        self.errors: list[AccelError] = []

    def check(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``check(*args, **kwargs)``; its result, or ``None`` when it raised a problem."""
        try:
            return check(*args, **kwargs)
        except ErrorList as err:
            self.errors.extend(err.errors)
        except AccelError as err:
            self.errors.append(err)
        return None

    def raise_any(self) -> None:
        """Raise what was found; a problem two checks both saw (e.g. a broken data config,
        read by the data check and by the mixer check) is reported once."""
        unique: dict[str, AccelError] = {}
        for err in self.errors:
            unique.setdefault(str(err), err)
        found = list(unique.values())
        if len(found) == 1:
            raise found[0]
        if found:
            raise ErrorList(found)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or every choice that ``word``
    begins (so a cut-off name such as ``--fast`` lists ``--fast_kernels`` and ``--fast_moe``),
    or ``""``."""
    choices = list(choices)
    starting = sorted((c for c in choices if c.startswith(word)), key=len) if len(word) >= 4 else []
    if len(starting) > 1 and len(starting[0]) - len(word) > 2:  # cut off, not a typo
        return f" Did you mean one of {', '.join(repr(c) for c in sorted(starting))}?"
    close = starting or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "string_to_bool": "true or false",
}
_ARGPARSE_MESSAGES = (
    # argument --x: invalid choice: 'v' (choose from 'a', 'b')
    (
        re.compile(
            r"argument (?P<arg>\S+): invalid choice: (?P<value>.+) \(choose from (?P<choices>.*)\)$"
        ),
        "choice",
    ),
    (re.compile(r"argument (?P<arg>\S+): invalid (?P<type>\w+) value: (?P<value>.+)$"), "type"),
    (re.compile(r"argument (?P<arg>\S+): Truthy value expected: got (?P<value>\S+) .*$"), "bool"),
    (re.compile(r"argument (?P<arg>\S+): expected (?P<count>.+) arguments?$"), "count"),
    (re.compile(r"argument (?P<arg>\S+): ignored explicit argument (?P<value>.+)$"), "explicit"),
    (re.compile(r"argument (?P<arg>\S+): (?P<detail>.+)$"), "other"),
)


def argparse_message(message: str, prog: str) -> str:
    """Rewrite an argparse error as one line naming the flag, the value and the fix."""
    hint = f" Run `{prog} --help` for the options."
    for pattern, kind in _ARGPARSE_MESSAGES:
        match = pattern.match(message)
        if not match:
            continue
        arg = match["arg"].split("/")[0]
        if kind == "choice":
            choices = [c.strip().strip("'") for c in match["choices"].split(",")]
            value = match["value"].strip("'")
            return (
                f"{arg}: got '{value}', expected one of {match['choices']}."
                f"{did_you_mean(value, choices)}"
            )
        if kind == "type":
            expected = _TYPE_WORDS.get(match["type"], f"a {match['type']} value")
            return f"{arg}: got {match['value']}, expected {expected}.{hint}"
        if kind == "bool":
            return f"{arg}: got '{match['value']}', expected true or false.{hint}"
        if kind == "count":
            return f"{arg} needs a value ({match['count']} argument).{hint}"
        if kind == "explicit":
            return f"{arg} takes no value (got {match['value']}): pass {arg} alone.{hint}"
        return f"{arg}: {match['detail']}.{hint}"
    if message.startswith("ambiguous option:"):
        return f"{message}: spell the option out in full.{hint}"
    return f"{message}.{hint}"


def raise_argparse_error(message: str, prog: str) -> NoReturn:
    """``argparse.ArgumentParser.error`` for accel's parsers: a ConfigError, no usage dump."""
    raise ConfigError(argparse_message(message, prog))

"""The ``accel`` commands: the core's table plus what installed packages add through the
``accel.commands`` entry-point group.

A command is a module (``name = "package.module"`` in the group; ``plot.odm`` is the
sub-command ``accel plot odm``) that defines:

- ``HELP``: one line (the core's commands have theirs in the core's table instead);
  ``DESCRIPTION`` (optional): the command's own ``--help`` text;
- ``add_arguments(parser)`` (optional): its argparse arguments;
- ``run(args) -> int``: the command; with ``RAW_ARGS = True`` it gets the list of words after
  the command instead of parsed arguments (``accel train`` parses its own large set).

Listing the commands reads entry-point metadata only; a module is imported when its command
runs (or its group's ``--help`` is asked for), so ``accel --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

ENTRY_POINT_GROUP = "accel.commands"


@dataclass(frozen=True)
class CommandSpec:
    """Where a command lives, known without importing it."""

    name: str  # "train", or "plot.loss" for `accel plot loss`
    module: str
    distribution: str  # "accel-core" for the core's own
    help: str | None = None  # the core's table gives it; a plugin's comes with its module

    @property
    def words(self) -> list[str]:
        return self.name.split(".")

    def load(self) -> ModuleType:
        """The command's module; a package whose module cannot be found (removed, half
        installed) is one error naming the reinstall."""
        try:
            return importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            package = self.module.split(".")[0]
            if err.name is None or err.name.split(".")[0] != package:
                raise
            from accel.errors import PluginNotInstalledError
            from accel.registry import catalog_for_name, install_command

            entry = catalog_for_name(self.distribution)
            fix = (
                install_command(entry)
                if entry
                else f"pip install --force-reinstall {self.distribution}"
            )
            raise PluginNotInstalledError(
                f"`accel {' '.join(self.words)}` comes from the package '{self.distribution}', "
                f"whose module {self.module} cannot be imported ({err}). Reinstall it: {fix}"
            ) from None


def command_specs(core: Mapping[str, tuple[str, str]]) -> dict[str, CommandSpec]:
    """The core's commands and the installed packages' (a package cannot replace a core
    command; the first package to declare a name keeps it)."""
    specs = {name: CommandSpec(name, mod, "accel-core", text) for name, (mod, text) in core.items()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in specs:
            continue
        specs[ep.name] = CommandSpec(ep.name, ep.value.split(":")[0], dist)
    return specs


def top_level(specs: Mapping[str, CommandSpec]) -> dict[str, list[CommandSpec]]:
    """``{first word: [its specs]}``: one spec for a plain command, several for a group."""
    table: dict[str, list[CommandSpec]] = {}
    for spec in specs.values():
        table.setdefault(spec.words[0], []).append(spec)
    return table


def summary(word: str, specs: list[CommandSpec]) -> str:
    """The ``accel --help`` line of a command or group, from the table or metadata only."""
    if len(specs) == 1 and len(specs[0].words) == 1:
        spec = specs[0]
        return spec.help or _module_help(spec) or f"from {spec.distribution}"
    subs = ", ".join(
        f"{' '.join(s.words[1:])}"
        + ("" if s.distribution == "accel-core" else f" ({s.distribution})")
        for s in specs
    )
    return f"`accel {word} KIND ...`: {subs}"


def _module_help(spec: CommandSpec) -> str | None:
    """A package command's ``HELP`` (its module is small: it imports its work when it runs);
    a module that fails to import is named when the command is run, not in the listing."""
    try:
        return f"{spec.load().HELP} ({spec.distribution})"
    except Exception:
        return None

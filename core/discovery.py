"""Loading the installed plugins so that one broken package cannot stop the others.

Each entry point of the ``accel.plugins`` group is loaded on its own. One that fails to
import, whose class fails accel's checks at definition, that names no plugin class, or whose
plugin name another package uses too, is recorded as *broken* and skipped: every command
still works, ``accel plugins`` lists it with the error, a run prints it at the start, and it
is an error only when a run asks for it (its config path or flag). ``ACCEL_DISABLE_PLUGINS``
(comma separated plugin, entry-point or package names) switches plugins off without loading
them at all, e.g. to get past a package that breaks at import.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import AccelError
    from .registry import PluginInfo

#: environment variable: plugins (or their packages) to leave out, comma separated
DISABLE = "ACCEL_DISABLE_PLUGINS"


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin entry point that could not be used, and why."""

    name: str  # the plugin's name if its class loaded, else the entry point's
    distribution: str
    version: str
    entry_point: str
    error: str
    config_paths: tuple[str, ...] = ()  # known when the class loaded or the catalog names it
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"plugin '{self.name}' (entry point '{self.entry_point}' of package "
            f"'{self.distribution}') failed to load: {self.error}"
        )


@dataclass
class Discovery:
    """What discovery found: usable plugins by name, broken ones, and switched-off ones."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)  # "name (package)"

    def notes(self) -> list[str]:
        """One line per skipped plugin, for the start of a run."""
        lines = [
            f"accel: warning: {b.describe()}; skipped. Fix or uninstall '{b.distribution}', "
            f"or switch it off with {DISABLE}={b.name}"
            for b in self.broken
        ]
        if self.disabled:
            lines.append(f"accel: switched off by {DISABLE}: {', '.join(self.disabled)}")
        return lines


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def disabled_names(environ: dict[str, str] | None = None) -> set[str]:
    env = os.environ if environ is None else environ
    return {_norm(n) for n in env.get(DISABLE, "").split(",") if n.strip()}


def _catalog_names(distribution: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .registry import CATALOG

    for entry in CATALOG:
        if entry.distribution == distribution:
            return entry.config_paths, entry.flags
    return (), ()


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Discovery:
    """Load every ``accel.plugins`` entry point, recording the ones that fail."""
    from .registry import ENTRY_POINT_GROUP, plugin_info

    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    off = disabled_names()
    result = Discovery()
    named: dict[str, list[PluginInfo]] = {}
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        entry = f"{ep.name} = {ep.value}"
        if off & {_norm(ep.name), _norm(dist)}:
            result.disabled.append(f"{ep.name} ({dist})")
            continue
        cls = None
        try:
            cls = ep.load()
            info = plugin_info(cls, dist, version, entry)
        except Exception as err:  # any failure of a third-party package: report, skip
            paths, flags = _catalog_names(dist)
            loaded = isinstance(cls, type)
            name = str(getattr(cls, "name", "") or ep.name) if loaded else ep.name
            if loaded:
                paths = tuple(getattr(cls, "config_paths", ()) or paths)
                own = [getattr(f, "name", None) for f in getattr(cls, "flags", ()) or ()]
                flags = tuple(f for f in own if isinstance(f, str)) or flags
            message = f"{type(err).__name__}: {err}"
            result.broken.append(BrokenPlugin(name, dist, version, entry, message, paths, flags))
            continue
        if _norm(info.name) in off:
            result.disabled.append(f"{info.name} ({dist})")
            continue
        named.setdefault(info.name, []).append(info)
    for name, infos in named.items():
        if len(infos) == 1:
            result.plugins[name] = infos[0]
            continue
        packages = " and ".join(f"'{i.distribution}'" for i in infos)
        for info in infos:  # neither wins: which one would is an accident of install order
            result.broken.append(
                BrokenPlugin(
                    name,
                    info.distribution,
                    info.version,
                    info.entry_point,
                    f"two installed plugins are named '{name}' (from {packages}); "
                    "uninstall one of them",
                    tuple(info.cls.config_paths),
                    tuple(f.name for f in info.cls.flags),
                )
            )
    return result


def broken_for(path: str | None = None, flag: str | None = None) -> BrokenPlugin | None:
    """The broken (installed) plugin that owns config ``path`` or ``flag``, if any."""
    for b in discover().broken:
        if (path is not None and path in b.config_paths) or (flag is not None and flag in b.flags):
            return b
    return None


def switched_off(names: Iterable[str]) -> bool:
    """Whether ``ACCEL_DISABLE_PLUGINS`` names any of ``names`` (plugin or package names)."""
    return bool(disabled_names() & {_norm(n) for n in names})


def unavailable_error(
    what: str, path: str | None = None, flag: str | None = None
) -> AccelError | None:
    """The error for a run that asks (``what``) for a plugin that is installed but broken,
    or switched off; None if neither."""
    from .errors import PluginNotInstalledError
    from .registry import catalog_for_flag, catalog_for_path

    broken = broken_for(path, flag)
    if broken is not None:
        return PluginNotInstalledError(
            f"{what} needs the {broken.describe()}. Fix or reinstall '{broken.distribution}'"
        )
    entry = catalog_for_path(path) if path is not None else None
    entry = entry or (catalog_for_flag(flag) if flag is not None else None)
    if entry is not None and switched_off((entry.distribution, entry.package, *entry.plugins)):
        return PluginNotInstalledError(
            f"{what} needs the plugin package '{entry.distribution}', which {DISABLE} switches "
            "off; remove it from that list"
        )
    return None


def discover_for_run() -> dict[str, PluginInfo]:
    """The usable plugins of a run; skipped ones are named on stderr (local rank 0 only)."""
    import sys

    found = discover()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for line in found.notes():
            print(line, file=sys.stderr, flush=True)
    return found.plugins

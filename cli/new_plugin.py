"""``accel new plugin NAME [--dir DIR]``: write a complete, installable plugin package to start
from into ``DIR/NAME`` (its files: :mod:`accel.cli.plugin_template`).

The name is checked first (a lower-case Python identifier that no known plugin uses); the
package is written into a staging folder beside the target and renamed into place, so an
existing folder is never overwritten and an interrupted run leaves no half-written package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Write an installable accel plugin package into DIR/NAME: pyproject.toml (the accel.plugins "
    "entry point), src/accel_NAME/ (a config dataclass, the flag --NAME, one patch rule), "
    "README.md and tests/test_plugin.py (tiny real models from accel.testing)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        metavar="NAME",
        help="plugin name: a lower-case Python identifier; also its flag --NAME and the "
        "package accel_NAME",
    )
    parser.add_argument(
        "--dir", default=".", help="folder to create NAME/ in (default: the current folder)"
    )


def run(args: argparse.Namespace) -> int:
    name = args.name
    check_name(name)
    target = Path(args.dir) / name
    files = _files(name)
    write_package(target, files)
    shown = str(target) if target.is_absolute() else f"./{target}"  # a path to pip, not a name
    print(f"accel: wrote plugin '{name}' to {shown}:")
    for path in files:
        print(f"  {path}")
    print(f"next: pip install -e {shown} && accel plugins && python -m pytest {shown}/tests")
    return 0


def check_name(name: str) -> None:
    """A name that can be the package ``accel_<name>``, the flag and the plugin name."""
    import keyword
    import re

    from accel.errors import ConfigError

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        hint = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_").lstrip("0123456789_")
        example = f" (e.g. '{hint}')" if hint and not keyword.iskeyword(hint) else ""
        raise ConfigError(
            f"plugin name '{name}': use a lower-case Python identifier (a letter, then letters, "
            f"digits or _){example}; it names the package accel_NAME and the flag --NAME"
        )
    taken = _taken_names()
    if name in taken:
        raise ConfigError(
            f"plugin name '{name}' is already used by {taken[name]}: choose another NAME"
        )


def _taken_names() -> dict[str, str]:
    """Installed plugins' entry-point names and the first-party catalog's plugins and flags
    (read from metadata and the catalog: no plugin is imported)."""
    from importlib import metadata

    from accel.registry import CATALOG, ENTRY_POINT_GROUP

    taken = {}
    for entry in CATALOG:
        for word in (*entry.plugins, *entry.flags):
            taken[word] = f"the {entry.distribution} plugin"
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "an installed package"
        taken.setdefault(ep.name, f"the installed package {dist}")
    return taken


def _files(name: str) -> dict[str, str]:
    from accel.version import __version__

    from .plugin_template import render

    major, minor = (int(part) for part in __version__.split(".")[:2])
    upper = f"{major}.{minor + 1}" if major == 0 else f"{major + 1}"
    return render(name, f">={major}.{minor},<{upper}")


def write_package(target: Path, files: dict[str, str]) -> None:
    """Write ``files`` (relative path -> text) as the new folder ``target``: into a staging
    folder beside it, then renamed into place (an empty ``target`` is replaced, any other
    existing one refused)."""
    import os
    import secrets
    import shutil

    from accel.errors import ConfigError

    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"'{target}' already exists and is not an empty folder: choose another NAME or "
            "--dir (nothing was written)"
        )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{target.name}.new-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as err:
        raise ConfigError(f"--dir {parent}: cannot create the package there ({err})") from None
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.rename(staging, target)  # atomic; fails if target became a non-empty folder
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"'{target}': not written ({err}); nothing was left behind") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

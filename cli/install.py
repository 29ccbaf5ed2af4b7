"""``accel install``: pip-install plugin packages (pip runs as a subprocess).

From a checkout, plugins install from ``plugins/<name>`` under the checkout's constraints
file (so no package can pull another torch); elsewhere, or with ``--find-links`` (a folder
that ``scripts/build-wheels.sh`` filled), they install by package name.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from accel.errors import AccelError, ConfigError
from accel.registry import CATALOG, CatalogEntry, catalog_for_name, checkout_root

HELP = "install plugins (from this checkout, else by package name)"


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "names",
        nargs="+",
        metavar="PLUGIN",
        help="a package name from `accel plugins` (or its distribution name)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the pip command only")
    parser.add_argument(
        "--editable",
        "-e",
        action="store_true",
        help="editable install from the checkout (the default there when accel-core itself is "
        "installed editable)",
    )
    parser.add_argument(
        "--force", action="store_true", help="reinstall packages that are installed already"
    )
    parser.add_argument(
        "--find-links",
        metavar="FOLDER",
        help="install the plugins' wheels from this folder (scripts/build-wheels.sh builds it), "
        "by package name, instead of from the checkout",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="show pip's own output")


def resolve(names: list[str]) -> list[CatalogEntry]:
    entries = []
    for name in names:
        entry = catalog_for_name(name)
        if entry is None:
            valid = ", ".join(e.package for e in CATALOG)
            from accel.errors import did_you_mean

            raise ConfigError(
                f"unknown plugin '{name}'.{did_you_mean(name, [e.package for e in CATALOG])} "
                f"Installable plugins: {valid}. A third-party plugin installs with pip directly."
            )
        if entry not in entries:
            entries.append(entry)
    return entries


def pip_command(
    entries: list[CatalogEntry], root: Path | None, editable: bool, find_links: str | None = None
) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install"]
    if find_links is not None:
        if editable:
            raise ConfigError("--editable installs from the checkout; drop it with --find-links")
        folder = Path(find_links)
        if not folder.is_dir():
            raise ConfigError(
                f"--find-links '{find_links}' is not a folder; build one with "
                "`bash scripts/build-wheels.sh <folder>` in a checkout"
            )
        return cmd + ["--find-links", str(folder.resolve())] + [e.distribution for e in entries]
    if root is None:
        if editable:
            raise ConfigError("--editable needs a checkout of the accel repository")
        return cmd + [e.distribution for e in entries]
    constraints = root / "requirements" / "constraints.txt"
    if constraints.is_file():
        cmd += ["-c", str(constraints)]
    for entry in entries:
        folder = root / entry.checkout_folder
        if not (folder / "pyproject.toml").is_file():
            raise ConfigError(
                f"plugin '{entry.package}' ({entry.distribution}) is not in this checkout "
                f"(no {folder}/pyproject.toml); this version of accel does not ship it yet"
            )
        cmd += ["-e", str(folder)] if editable else [str(folder)]
    return cmd


def editable_source(distribution: str) -> Path | None:
    """The folder an installed distribution is installed editable from (``None``: not
    installed, or installed as a copy), read from its ``direct_url.json`` (PEP 610)."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    # every copy the path knows (an ``*.egg-info`` folder in the current directory shadows
    # the installed metadata); the installed one is the one with ``direct_url.json``
    raws = [d.read_text("direct_url.json") for d in metadata.distributions(name=distribution)]
    raw = next((r for r in raws if r), None)
    info = json.loads(raw) if raw else {}
    if not info.get("dir_info", {}).get("editable"):
        return None
    return Path(unquote(urlparse(info.get("url", "")).path)).resolve()


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def run(args: Any) -> int:
    entries = resolve(args.names)
    find_links = getattr(args, "find_links", None)
    root = None if find_links is not None else checkout_root()
    editable = args.editable or (
        root is not None and editable_source("accel-core") == root.resolve()
    )
    todo = []
    for entry in entries:
        source = editable_source(entry.distribution)
        if args.force:
            todo.append(entry)
        elif root is not None and editable and source == (root / entry.checkout_folder).resolve():
            print(f"accel: {entry.distribution} is installed already (editable, from {source})")
        elif not editable and _installed(entry.distribution) and source is None:
            print(f"accel: {entry.distribution} is installed already (--force reinstalls it)")
        else:
            todo.append(entry)
    if not todo:
        return 0
    cmd = pip_command(todo, root, editable, find_links)
    if not args.verbose:
        cmd.insert(4, "-q")  # pip install -q: errors still show
    shown = " ".join(shlex.quote(c) for c in cmd)
    if args.dry_run:
        print(f"accel: would run: {shown}")
        return 0
    print(f"accel: installing {', '.join(e.distribution for e in todo)}: {shown}", flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise AccelError(
            f"pip failed (exit {done.returncode}) installing {', '.join(e.distribution for e in todo)}"
        )
    how = " (editable: edits in the checkout take effect)" if editable and root else ""
    print(
        f"accel: installed {', '.join(e.distribution for e in todo)}{how}; `accel plugins` lists them"
    )
    return 0

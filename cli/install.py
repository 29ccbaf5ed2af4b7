"""``accel install``: pip-install plugin packages (pip runs as a subprocess).

From a checkout, plugins install from ``plugins/<name>`` under the checkout's constraints
file (so no package can pull another torch); elsewhere they install by package name.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from accel.errors import AccelError, ConfigError
from accel.registry import CATALOG, CatalogEntry, catalog_for_name, checkout_root


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


def pip_command(entries: list[CatalogEntry], root: Path | None, editable: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install"]
    if root is None:
        if editable:
            raise ConfigError("--editable needs a checkout of the accel repository")
        return cmd + [e.distribution for e in entries]
    constraints = root / "requirements" / "constraints.txt"
    if constraints.is_file():
        cmd += ["-c", str(constraints)]
    for entry in entries:
        folder = root / "plugins" / entry.package
        if not (folder / "pyproject.toml").is_file():
            raise ConfigError(
                f"plugin '{entry.package}' ({entry.distribution}) is not in this checkout "
                f"(no {folder}/pyproject.toml); this version of accel does not ship it yet"
            )
        cmd += ["-e", str(folder)] if editable else [str(folder)]
    return cmd


def run_install(args: Any) -> int:
    entries = resolve(args.names)
    cmd = pip_command(entries, checkout_root(), args.editable)
    print("accel: running", " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise AccelError(
            f"pip failed (exit {done.returncode}) installing {', '.join(e.distribution for e in entries)}"
        )
    print(
        f"accel: installed {', '.join(e.distribution for e in entries)}; `accel plugins` lists them"
    )
    return 0

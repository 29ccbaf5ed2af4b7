"""``accel plugins``: what is installed, and what this checkout could install."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from accel.registry import CATALOG, checkout_root, discover_plugins, install_command


def _installed_rows() -> list[dict[str, Any]]:
    rows = []
    for info in sorted(discover_plugins().values(), key=lambda i: i.name):
        cls = info.cls
        rows.append(
            {
                "name": info.name,
                "package": info.distribution,
                "version": info.version,
                "config_paths": list(cls.config_paths),
                "flags": [f"--{f.name}" for f in cls.flags],
                "flag_usage": [f.usage() for f in cls.flags],
                "model_types": list(cls.model_types) if cls.model_types is not None else "any",
                "requires": list(cls.requires),
            }
        )
    return rows


def _not_installed_rows(installed_packages: set[str]) -> list[dict[str, Any]]:
    root = checkout_root()
    rows = []
    for entry in CATALOG:
        if entry.distribution in installed_packages:
            continue
        try:
            metadata.version(entry.distribution)
            continue  # installed, but registers no plugin: listed as broken below
        except metadata.PackageNotFoundError:
            pass
        in_checkout = (
            root is not None and (root / "plugins" / entry.package / "pyproject.toml").is_file()
        )
        rows.append(
            {
                "package": entry.distribution,
                "plugins": list(entry.plugins),
                "config_paths": list(entry.config_paths),
                "flags": [f"--{f}" for f in entry.flags],
                "summary": entry.summary,
                "in_this_checkout": in_checkout,
                "install": install_command(entry),
            }
        )
    return rows


def run_plugins(args: Any) -> int:
    installed = _installed_rows()
    available = _not_installed_rows({row["package"] for row in installed})
    if args.json:
        print(json.dumps({"installed": installed, "not_installed": available}, indent=2))
        return 0
    print("Installed plugins:")
    if not installed:
        print("  (none)")
    for row in installed:
        print(f"  {row['name']}  [{row['package']} {row['version']}]")
        print(f"      config paths: {', '.join('plugins.' + p for p in row['config_paths'])}")
        print(f"      flags:        {'; '.join(row['flag_usage']) or '-'}")
        models = row["model_types"]
        print(f"      models:       {models if isinstance(models, str) else ', '.join(models)}")
        if row["requires"]:
            print(f"      requires:     {', '.join(row['requires'])}")
    print("\nAvailable, not installed:")
    if not available:
        print("  (none)")
    for row in available:
        where = "in this checkout" if row["in_this_checkout"] else "from the package index"
        print(f"  {row['package']}  ({', '.join(row['plugins'])}): {row['summary']}")
        print(f"      config paths: {', '.join('plugins.' + p for p in row['config_paths'])}")
        print(f"      flags:        {', '.join(row['flags'])}")
        print(f"      install:      {row['install']}   ({where})")
    return 0

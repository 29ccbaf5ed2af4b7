"""``accel plugins``: what is installed, and what this checkout could install."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

from accel.registry import CATALOG, checkout_root, discover_plugins, install_command


def add_arguments(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


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
        if not entry.plugins:  # a tool (accel-bench), not a plugin
            continue
        if entry.distribution in installed_packages:
            continue
        try:
            metadata.version(entry.distribution)
            continue  # installed, but registers no plugin: listed as broken below
        except metadata.PackageNotFoundError:
            pass
        in_checkout = (
            root is not None and (root / entry.checkout_folder / "pyproject.toml").is_file()
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


def _skipped() -> tuple[list[dict[str, Any]], list[str]]:
    """Installed plugins that failed to load, and the ones ACCEL_DISABLE_PLUGINS switches off."""
    from accel.discovery import discover

    found = discover()
    broken = [
        {
            "name": b.name,
            "package": b.distribution,
            "version": b.version,
            "entry_point": b.entry_point,
            "error": b.error,
        }
        for b in found.broken
    ]
    return broken, found.disabled


def run(args: Any) -> int:
    installed = _installed_rows()
    broken, disabled = _skipped()
    skipped = {row["package"] for row in installed} | {row["package"] for row in broken}
    available = _not_installed_rows(skipped)
    if args.json:
        tables = {"installed": installed, "not_installed": available}
        print(json.dumps({**tables, "broken": broken, "disabled": disabled}, indent=2))
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
    if broken:
        print("\nBroken (skipped; an error only for a run that uses them):")
    for row in broken:
        print(f"  {row['name']}  [{row['package']} {row['version']}]  {row['entry_point']}")
        print(f"      error:        {row['error']}")
        print(f"      switch off:   ACCEL_DISABLE_PLUGINS={row['name']}")
    if disabled:
        print(f"\nSwitched off by ACCEL_DISABLE_PLUGINS: {', '.join(disabled)}")
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

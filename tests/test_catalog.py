"""The first-party catalog (accel.registry.CATALOG) cannot drift from the plugins it names.

The catalog answers "which package do I install?" for a flag or config path whose plugin is
missing, so its names must be exactly the plugin classes' names, paths and flags, and its
plugin names exactly the entry points the packages register.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from accel.registry import CATALOG, ENTRY_POINT_GROUP, CatalogEntry, discover_plugins

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [e for e in CATALOG if (REPO / "plugins" / e.package / "pyproject.toml").is_file()]


def project(entry: CatalogEntry) -> dict:
    return tomllib.loads((REPO / "plugins" / entry.package / "pyproject.toml").read_text())


def test_every_plugin_folder_is_in_the_catalog():
    folders = {p.parent.name for p in (REPO / "plugins").glob("*/pyproject.toml")}
    assert folders == {e.package for e in SHIPPED}, "add the new plugin package to CATALOG"


def test_catalog_names_are_unique():
    columns = {
        "package": [e.package for e in CATALOG],
        "distribution": [e.distribution for e in CATALOG],
        "plugins": [p for e in CATALOG for p in e.plugins],
        "config_paths": [p for e in CATALOG for p in e.config_paths],
        "flags": [f for e in CATALOG for f in e.flags],
    }
    for column, values in columns.items():
        assert len(values) == len(set(values)), f"CATALOG repeats a value of {column}"


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.package)
def test_entry_points_and_distribution_match_the_catalog(entry):
    meta = project(entry)["project"]
    assert meta["name"] == entry.distribution
    entry_points = meta.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    assert set(entry_points) == set(entry.plugins)
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = core["optional-dependencies"].get(entry.extra, [])
    assert any(req.startswith(entry.distribution) for req in extra), (
        f"the core's extra '{entry.extra}' must install {entry.distribution}"
    )


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.package)
def test_installed_plugin_classes_match_the_catalog(entry):
    installed = {
        n: i for n, i in discover_plugins().items() if i.distribution == entry.distribution
    }
    if not installed:
        pytest.skip(f"{entry.distribution} is not installed")
    assert set(installed) == set(entry.plugins)  # entry-point names are the classes' names
    for name, info in installed.items():
        ep_name = info.entry_point.split(" = ")[0]
        assert ep_name == name, f"entry point '{ep_name}' loads the plugin named '{name}'"
    paths = [p for n in entry.plugins for p in installed[n].cls.config_paths]
    flags = [f.name for n in entry.plugins for f in installed[n].cls.flags]
    assert sorted(paths) == sorted(entry.config_paths)
    assert sorted(flags) == sorted(entry.flags)

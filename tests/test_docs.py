"""The configuration reference is generated from the code; the committed copy must match."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel.reference import render
from accel.registry import CATALOG, discover_plugins

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MARKER = "<!-- generated: python -m accel.reference -->\n"


def test_configuration_reference_is_current():
    shipped = {
        p for e in CATALOG if (DOC.parents[1] / "plugins" / e.package).is_dir() for p in e.plugins
    }
    if set(discover_plugins()) != shipped:
        pytest.skip("the reference covers exactly the plugins of this checkout; install them all")
    text = DOC.read_text()
    assert MARKER in text, "docs/configuration.md lost its generated-section marker"
    generated = text.split(MARKER, 1)[1]
    assert generated == render(), "regenerate with: python scripts/update_docs.py"


def test_plugin_guide_hook_table_is_the_spec():
    """The guide's hook table is generated from accel.hookspecs: a new hook shows up there."""
    from accel.hookspecs import SPECS
    from accel.reference import HOOK_TABLE_END, HOOK_TABLE_START, hook_table

    text = (DOC.parent / "plugin-authoring.md").read_text()
    assert HOOK_TABLE_START in text and HOOK_TABLE_END in text
    table = text.split(HOOK_TABLE_START, 1)[1].split(HOOK_TABLE_END, 1)[0]
    assert table == hook_table(), "regenerate with: python scripts/update_docs.py"
    assert all(f"| `{name}(" in table for name in SPECS)

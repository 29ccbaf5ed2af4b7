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

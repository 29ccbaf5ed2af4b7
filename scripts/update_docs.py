"""Regenerate the generated part of docs/configuration.md (run after changing a schema)."""

from pathlib import Path

from accel.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MARKER = "<!-- generated: python -m accel.reference -->\n"

head = DOC.read_text().split(MARKER, 1)[0]
DOC.write_text(head + MARKER + render())
print(f"updated {DOC}")

"""Regenerate the generated parts of the docs (run after changing a schema or a hook spec):
the reference in docs/configuration.md and the hook table of docs/plugin-authoring.md."""

from pathlib import Path

from accel.reference import HOOK_TABLE_END, HOOK_TABLE_START, hook_table, render

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = "<!-- generated: python -m accel.reference -->\n"

reference = DOCS / "configuration.md"
head = reference.read_text().split(MARKER, 1)[0]
reference.write_text(head + MARKER + render())
print(f"updated {reference}")

guide = DOCS / "plugin-authoring.md"
before, rest = guide.read_text().split(HOOK_TABLE_START, 1)
after = rest.split(HOOK_TABLE_END, 1)[1]
guide.write_text(before + HOOK_TABLE_START + hook_table() + HOOK_TABLE_END + after)
print(f"updated {guide}")

"""The README's feature and model tables, generated from the feature records and the support
table.

``python -m accel_fused_ops.model_table`` prints them; ``--write README.md`` replaces the block
between the markers in that file. A test checks that the README holds exactly this text, so
the tables cannot drift from ``features.FEATURES`` and ``support.ARCHITECTURES``.
"""

from __future__ import annotations

from accel.api import GeneratedBlock, cell

from .features import COLUMNS, FEATURE_BY_NAME
from .support import ARCHITECTURES

README_BLOCK = GeneratedBlock("model-table", "python -m accel_fused_ops.model_table")


def markdown() -> str:
    """The rules table (feature, rules, what they patch) and the feature x model table."""
    lines = ["| feature | patch rule(s) | what is patched |", "|---|---|---|"]
    for name in COLUMNS:
        feature = FEATURE_BY_NAME[name]
        rules = ", ".join(f"`{r}`" for r in feature.rule_names)
        lines.append(f"| `{name}` | {rules} | {feature.patches} |")
    lines += ["", "| model_type | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    notes: list[str] = []
    for model_type, arch in ARCHITECTURES.items():
        cells = []
        for name in COLUMNS:
            mark, text = cell(arch.support(name))
            if text:
                notes.append(f"{model_type} / {name}: {text}")
            cells.append(f"{mark} ({len(notes)})" if text else mark)
        lines.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({i}) {note}  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    raise SystemExit(README_BLOCK.main(markdown))

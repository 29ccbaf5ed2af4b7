"""The feature x model table of the README, generated from the data the rules use.

``python -m accel_fused_ops.model_table`` prints it; ``--write README.md`` replaces the block
between the markers in that file. A test checks that the README holds exactly this text, so
the table cannot drift from ``support.FEATURES`` and ``rules.RULE_NAMES``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .rules import RULE_NAMES
from .support import ALL_MODEL_TYPES, FEATURES

START = "<!-- model-table:start (generated: python -m accel_fused_ops.model_table) -->"
END = "<!-- model-table:end -->"
#: the columns in the order users set them: the --fast_kernels values, then fused_lora
COLUMNS = ("fast_loss", "fast_rms_layernorm", "fast_rope_embeddings", "fast_swiglu", "fused_lora")


def markdown() -> str:
    """The rules table (feature, rules, what they patch) and the feature x model table."""
    lines = ["| feature | patch rule(s) | what is patched |", "|---|---|---|"]
    for name in COLUMNS:
        rules = ", ".join(f"`{r}`" for r in RULE_NAMES[name])
        lines.append(f"| `{name}` | {rules} | {FEATURES[name].patches} |")
    lines += ["", "| model_type | " + " | ".join(f"`{c}`" for c in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    notes: list[str] = []
    for model_type in ALL_MODEL_TYPES:
        cells = []
        for name in COLUMNS:
            feature = FEATURES[name]
            if model_type in feature.model_types:
                cells.append("yes")
                continue
            notes.append(f"{model_type} / {name}: {feature.excluded[model_type]}")
            cells.append(f"no ({len(notes)})")
        lines.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"({i}) {note}  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the generated block between START and END replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START!r} and {END!r} are missing; add them first")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def block_of(text: str) -> str:
    """The generated block currently in ``text`` (between the markers)."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START!r} and {END!r} are missing")
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="README to update in place")
    args = parser.parse_args(argv)
    table = markdown()
    if args.write is None:
        sys.stdout.write(table)
        return 0
    args.write.write_text(replace_block(args.write.read_text(), table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

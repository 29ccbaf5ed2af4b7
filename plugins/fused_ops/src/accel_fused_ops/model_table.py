"""The README's feature and model tables, generated from the feature records and the support
table.

``python -m accel_fused_ops.model_table`` prints them; ``--write README.md`` replaces the block
between the markers in that file. A test checks that the README holds exactly this text, so
the tables cannot drift from ``features.FEATURES`` and ``support.ARCHITECTURES``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .features import FEATURE_BY_NAME
from .support import ARCHITECTURES

START = "<!-- model-table:start (generated: python -m accel_fused_ops.model_table) -->"
END = "<!-- model-table:end -->"
#: the columns in the order users set them: the --fast_kernels values, then fused_lora
COLUMNS = ("fast_loss", "fast_rms_layernorm", "fast_rope_embeddings", "fast_swiglu", "fused_lora")


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
            support = arch.support(name)
            text = support.note if support.supported else support.reason
            if text:
                notes.append(f"{model_type} / {name}: {text}")
            mark = "yes" if support.supported else "no"
            cells.append(f"{mark} ({len(notes)})" if text else mark)
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
    text = replace_block(args.write.read_text(), table)
    tmp = args.write.with_name(f".{args.write.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

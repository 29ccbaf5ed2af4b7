"""The per-architecture support table of padding_free and multipack (multipack needs
padding_free, so one entry serves both): Supported, or Unsupported with the reason.

An architecture is Supported only when ``tests/test_varlen_models.py`` finds the packed rows'
per-token loss and every parameter gradient equal to the padded batch's (fp32); that test
reads its list from here. The plugins' ``model_types`` (the core's gate, checked before the
model is loaded) are the Supported entries; the README table is generated from the whole table
(``python -m accel_attention_packing.support --write README.md``, a test keeps it current).
Pure data: importing it loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Supported:
    """Packed training tested equal to padded batches for this architecture."""

    note: str = ""
    supported = True


@dataclass(frozen=True)
class Unsupported:
    """Refused, and why (shown in the README table)."""

    reason: str
    supported = False


Support = Supported | Unsupported

_NO_SDPA = (
    "transformers refuses sdpa-style attention functions for {} (no sdpa support in this "
    "version), so accel_varlen_sdpa cannot be set"
)

ARCHITECTURES: dict[str, Support] = {
    "llama": Supported(),
    "mistral": Supported(),
    "mixtral": Supported(),
    "granite": Supported(),
    "granitemoe": Supported(),
    "granitemoehybrid": Supported(
        "attention-only models (Granite 4 dense); a model with Mamba layers is refused, their "
        "scan would run across the examples of a packed row"
    ),
    "gpt_bigcode": Supported(),
    "qwen2": Supported(),
    "qwen3": Supported(),
    "phi3": Supported(),
    "olmo2": Supported(),
    "smollm3": Supported(),
    "gemma3_text": Supported(),
    "gemma2": Unsupported(_NO_SDPA.format("Gemma2ForCausalLM")),
    "gpt_oss": Unsupported(
        _NO_SDPA.format("GptOssForCausalLM") + "; its attention sinks (s_aux) are not "
        "implemented by accel_varlen_sdpa either"
    ),
    "gemma3": Unsupported(
        "the image-text model (its image tokens have their own attention mask) is not tested "
        "with packed rows; gemma3_text is"
    ),
}

#: the architectures the plugins accept
SUPPORTED_MODEL_TYPES = tuple(t for t, s in ARCHITECTURES.items() if s.supported)


def config_refusal(model_config: object) -> str | None:
    """Why a model of a Supported type still cannot be packed (its config), or None."""
    layer_types = getattr(model_config, "layer_types", None) or ()
    if getattr(model_config, "model_type", None) == "granitemoehybrid":
        other = sorted({str(t) for t in layer_types} - {"attention", "full_attention"})
        if other:
            return (
                f"granitemoehybrid with {', '.join(other)} (Mamba) layers: their scan would "
                "run across the examples of a packed row; only attention-only models pack"
            )
    return None


START = "<!-- support-table:start (generated: python -m accel_attention_packing.support) -->"
END = "<!-- support-table:end -->"


def markdown() -> str:
    """The README's architecture table."""
    lines = ["| model_type | padding_free / multipack |", "|---|---|"]
    for model_type, support in ARCHITECTURES.items():
        text = support.note if support.supported else support.reason
        mark = "yes" if support.supported else "no"
        lines.append(f"| `{model_type}` | {mark}{f': {text}' if text else ''} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the block between START and END replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START!r} and {END!r} are missing; add them first")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def block_of(text: str) -> str:
    """The generated block currently in ``text``."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START!r} and {END!r} are missing")
    return text.split(START, 1)[1].split(END, 1)[0].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print or write the README support table")
    parser.add_argument("--write", type=Path, help="README to update in place")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(markdown())
        return 0
    text = replace_block(args.write.read_text(), markdown())
    tmp = args.write.with_name(f".{args.write.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

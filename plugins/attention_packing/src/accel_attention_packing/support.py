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

from accel.api import GeneratedBlock, Support, Supported, Unsupported, cell

__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "Support", "Supported", "Unsupported"]

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
#: the refused ones, with the reason the core's refusal shows
UNSUPPORTED_REASONS = {t: s.reason for t, s in ARCHITECTURES.items() if not s.supported}


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


README_BLOCK = GeneratedBlock("support-table", "python -m accel_attention_packing.support")


def markdown() -> str:
    """The README's architecture table."""
    lines = ["| model_type | padding_free / multipack |", "|---|---|"]
    for model_type, support in ARCHITECTURES.items():
        mark, text = cell(support)
        lines.append(f"| `{model_type}` | {mark}{f': {text}' if text else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(README_BLOCK.main(markdown))

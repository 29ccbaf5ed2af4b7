"""The support table is the one source: the plugins' gate, the tested list and the README."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel_attention_packing import support
from accel_attention_packing.plugin import MultipackPlugin, PaddingFreePlugin

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert support.README_BLOCK.current(README.read_text()) == support.markdown(), (
        "README table is stale: run python -m accel_attention_packing.support --write README.md"
    )


def test_plugins_accept_exactly_the_supported_entries():
    supported = tuple(t for t, s in support.ARCHITECTURES.items() if s.supported)
    assert PaddingFreePlugin.model_types == MultipackPlugin.model_types == supported
    for model_type, entry in support.ARCHITECTURES.items():
        if not entry.supported:
            assert entry.reason and model_type not in supported
    # the refused entries' reasons are what the core's UnsupportedModelError shows
    assert PaddingFreePlugin.unsupported_reasons == {
        t: s.reason for t, s in support.ARCHITECTURES.items() if not s.supported
    }


def test_granite_hybrid_with_mamba_layers_is_refused():
    from accel import UnsupportedModelError, testing

    dense = testing.tiny_config("granitemoehybrid")
    assert support.config_refusal(dense) is None
    hybrid = testing.tiny_config("granitemoehybrid", layer_types=["mamba", "attention"])
    assert "linear_attention (Mamba) layers" in support.config_refusal(hybrid)
    model = testing.tiny_model("granitemoehybrid", layer_types=["mamba", "attention"])
    plugin = PaddingFreePlugin({})
    with pytest.raises(
        UnsupportedModelError, match="padding_free: granitemoehybrid with linear_attention"
    ):
        plugin.augment_model(model=model, train_args=None, peft_config=None)

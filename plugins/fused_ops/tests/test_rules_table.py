"""The README's feature x model table is exactly the one generated from the rules' data."""

from __future__ import annotations

from pathlib import Path

from accel_fused_ops import model_table
from accel_fused_ops.plugin import FusedOpsPlugin
from accel_fused_ops.rules import FEATURE_ORDER, RULE_NAMES
from accel_fused_ops.support import ALL_MODEL_TYPES, FEATURES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert model_table.block_of(README.read_text()) == model_table.markdown(), (
        "README table is stale: run python -m accel_fused_ops.model_table --write README.md"
    )


def test_table_covers_every_feature_and_architecture():
    assert set(model_table.COLUMNS) == set(FEATURE_ORDER) == set(FEATURES) == set(RULE_NAMES)
    assert FusedOpsPlugin.model_types == ALL_MODEL_TYPES
    table = model_table.markdown()
    for model_type in ALL_MODEL_TYPES:
        assert f"| `{model_type}` |" in table
    for feature in FEATURES.values():  # every gap is explained
        assert set(ALL_MODEL_TYPES) - set(feature.model_types) == set(feature.excluded)


def test_write_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{model_table.START}\nold\n{model_table.END}\noutro\n")
    assert model_table.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text
    assert model_table.block_of(text) == model_table.markdown()

"""The README's feature x model table is exactly the one generated from the rules' data."""

from __future__ import annotations

from pathlib import Path

from accel_fused_ops import model_table
from accel_fused_ops.features import FEATURES
from accel_fused_ops.plugin import FusedOpsPlugin
from accel_fused_ops.rules import FEATURE_ORDER, RULE_NAMES
from accel_fused_ops.support import ALL_MODEL_TYPES, ARCHITECTURES, FEATURE_NAMES, Unsupported

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert model_table.README_BLOCK.current(README.read_text()) == model_table.markdown(), (
        "README table is stale: run python -m accel_fused_ops.model_table --write README.md"
    )


def test_table_covers_every_feature_and_architecture():
    names = tuple(f.name for f in FEATURES)
    assert names == FEATURE_ORDER == FEATURE_NAMES == tuple(RULE_NAMES)
    assert set(model_table.COLUMNS) == set(names)
    assert FusedOpsPlugin.model_types == ALL_MODEL_TYPES
    table = model_table.markdown()
    for model_type, arch in ARCHITECTURES.items():
        assert f"| `{model_type}` |" in table
        assert set(arch.features) == set(names), model_type  # every feature has an entry
        for feature, support in arch.features.items():
            if isinstance(support, Unsupported):  # every gap is explained, in the table too
                assert support.reason and support.reason in table, (model_type, feature)


def test_every_config_field_belongs_to_a_feature():
    from dataclasses import fields

    from accel_fused_ops.config import FusedOpsConfig

    claimed = [name for f in FEATURES for name in f.fields]
    assert len(claimed) == len(set(claimed)), "a field is claimed by two features"
    assert set(claimed) == {f.name for f in fields(FusedOpsConfig)}


def test_report_lines_come_from_the_records():
    from accel_fused_ops.config import FusedOpsConfig
    from accel_fused_ops.plugin import TRAINING_PATH

    settings = FusedOpsConfig(
        fast_loss=True, label_smoothing=0.1, token_accuracy=True, fast_rope_embeddings=True
    )
    lines = FusedOpsPlugin({TRAINING_PATH: settings}).report_lines()
    assert lines[0] == "features: fast_rope_embeddings, fast_loss"  # application order
    assert lines[1] == "loss: fused_linear (label_smoothing 0.1, token_accuracy)"
    assert lines[2].startswith("rope: apply_rotary_pos_emb is replaced in the modeling file")
    assert len(lines) == 3
    assert FusedOpsPlugin({TRAINING_PATH: FusedOpsConfig(fast_swiglu=True)}).report_lines() == [
        "features: fast_swiglu"
    ]

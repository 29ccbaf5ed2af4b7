"""The README's feature x model table is exactly the one generated from the records, every
list of features is derived from the records, and the table's Supported entries are exactly
what the model-level tests train (drift tests)."""

from __future__ import annotations

from pathlib import Path

from accel_fused_ops import model_table
from accel_fused_ops.features import COLUMNS, FEATURES
from accel_fused_ops.plugin import FusedOpsPlugin
from accel_fused_ops.support import ALL_MODEL_TYPES, ARCHITECTURES, Unsupported

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert model_table.README_BLOCK.current(README.read_text()) == model_table.markdown(), (
        "README table is stale: run python -m accel_fused_ops.model_table --write README.md"
    )


def test_table_covers_every_feature_and_architecture():
    names = tuple(f.name for f in FEATURES)
    assert set(COLUMNS) == set(names) and len(COLUMNS) == len(names)
    assert FusedOpsPlugin.model_types == ALL_MODEL_TYPES
    table = model_table.markdown()
    for model_type, arch in ARCHITECTURES.items():
        assert f"| `{model_type}` |" in table
        assert set(arch.features) == set(names), model_type  # every feature has an entry
        for feature, support in arch.features.items():
            if isinstance(support, Unsupported):  # every gap is explained, in the table too
                assert support.reason and support.reason in table, (model_type, feature)


def test_the_config_schema_is_the_records_fields():
    """The schema is assembled from the records: a new feature's record is its config field
    (type, default, help), nothing else to edit."""
    from dataclasses import MISSING, fields

    from accel_fused_ops.config import FusedOpsConfig

    claimed = [name for f in FEATURES for name in f.fields]
    assert len(claimed) == len(set(claimed)), "a field is claimed by two features"
    schema = {f.name: f for f in fields(FusedOpsConfig)}
    assert set(claimed) == set(schema)
    for feature in FEATURES:
        for option in feature.schema:
            got = schema[option.name]
            assert got.default == option.default and got.default is not MISSING
            assert got.metadata["help"] == option.help and got.type == option.type


def test_report_lines_come_from_the_records():
    from accel_fused_ops.config import FusedOpsConfig
    from accel_fused_ops.features import TRAINING_PATH

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


def test_flags_are_derived_from_the_records():
    flags = {f.name: f for f in FusedOpsPlugin.flags}
    assert flags["fast_kernels"].fields == (
        "fast_loss",
        "fast_rms_layernorm",
        "fast_rope_embeddings",
        "fast_swiglu",
    )  # fms-hf-tuning's order of --fast_kernels values
    assert flags["fused_lora"].fields == ("base_layer", "fused_lora")
    assert (*flags["fast_kernels"].fields, "fused_lora") == COLUMNS


def test_options_of_a_feature_that_is_off_are_refused():
    import pytest

    from accel_fused_ops.config import FusedOpsConfig

    with pytest.raises(ValueError, match="z_loss set but fast_loss is off"):
        FusedOpsConfig(z_loss=0.1)
    FusedOpsConfig(base_layer="auto_gptq")  # --fused_lora auto_gptq False stays valid
    assert FusedOpsConfig().enables_nothing()
    assert not FusedOpsConfig(fast_swiglu=True).enables_nothing()


def test_a_new_feature_is_unsupported_until_verified(monkeypatch):
    """A record without ``verified_on`` is Unsupported ("not verified") on every
    architecture, in the table and in the rules' check."""
    import dataclasses
    import importlib

    from accel_fused_ops import features, support

    rms_types = support.supported_types("fast_rms_layernorm")
    switch = features.Option("fast_new_kernel", bool, False, "a new kernel")
    new = dataclasses.replace(FEATURES[1], switch=switch, verified_on=())
    monkeypatch.setattr(features, "FEATURES", (*FEATURES, new))
    try:
        fresh = importlib.reload(support)
        assert fresh.supported_types("fast_new_kernel") == ()
        for arch in fresh.ARCHITECTURES.values():
            assert arch.support("fast_new_kernel").reason == fresh.NOT_VERIFIED
        assert fresh.supported_types("fast_rms_layernorm") == rms_types
    finally:
        monkeypatch.undo()
        importlib.reload(support)


def test_supported_entries_are_what_the_model_level_tests_train():
    """Each feature Supported somewhere is trained by a model-level test on every
    architecture where it is Supported: the kernel features by
    ``test_features_train_like_the_unpatched_model`` (all architectures, each Supported
    feature), fused_lora by ``test_fused_lora_with_dropout_on_every_architecture``."""
    import test_models
    from tiny_models import MODEL_TYPES

    from accel_fused_ops.support import supported_types

    assert tuple(MODEL_TYPES) == ALL_MODEL_TYPES
    trained = set(test_models.KERNEL_FEATURES) | {"fused_lora"}
    claimed = {f.name for f in FEATURES if supported_types(f.name)}
    assert claimed == trained, (
        "a feature is Supported in the table but no model-level test trains it, or the "
        f"reverse: table {sorted(claimed)}, tests {sorted(trained)}"
    )

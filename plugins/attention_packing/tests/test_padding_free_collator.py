"""PaddingFreeCollator: layout, label convention (checked against transformers), inputs."""

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from accel_attention_packing.collator import PaddingFreeCollator

EXAMPLES = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def test_layout_positions_and_flash_kwargs():
    batch = PaddingFreeCollator(return_seq_idx=True)([{"input_ids": e} for e in EXAMPLES])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, 11, 12, 13]]
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert isinstance(batch["max_length_q"], int)
    assert "attention_mask" not in batch


@pytest.mark.parametrize("with_labels", [False, True])
def test_matches_transformers_flattening_collator(with_labels):
    rng = np.random.default_rng(0)
    feats = []
    for n in (4, 1, 7, 3):
        ids = rng.integers(0, 100, n).tolist()
        f = {"input_ids": ids}
        if with_labels:
            f["labels"] = [-100] * (n // 2) + ids[n // 2 :]  # completion-only prefix
        feats.append(f)
    ours = PaddingFreeCollator(return_seq_idx=True)(feats)
    ref = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(feats)
    assert set(ours) == set(ref)
    for key in ref:
        if isinstance(ref[key], torch.Tensor):
            assert ours[key].dtype == ref[key].dtype, key
            assert torch.equal(ours[key], ref[key]), key
        else:
            assert ours[key] == ref[key], key


def test_completion_only_labels_kept_as_given():
    feats = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    ]
    batch = PaddingFreeCollator()(feats)
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, -100, 6, 7]]


def test_completion_mask_builds_labels():
    feats = [{"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1]}]
    assert PaddingFreeCollator()(feats)["labels"].tolist() == [[-100, -100, 3, 4]]
    plain = PaddingFreeCollator(use_completion_mask=False)(feats)
    assert plain["labels"].tolist() == [[-100, 2, 3, 4]]


def test_tensor_numpy_and_list_inputs_agree():
    as_list = PaddingFreeCollator()([{"input_ids": e, "labels": e} for e in EXAMPLES])
    as_tensor = PaddingFreeCollator()(
        [{"input_ids": torch.tensor(e), "labels": torch.tensor(e)} for e in EXAMPLES]
    )
    as_numpy = PaddingFreeCollator()([{"input_ids": np.array(e)} for e in EXAMPLES])
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert torch.equal(as_list[key], as_tensor[key])
        assert torch.equal(as_list[key], as_numpy[key])


def test_optional_outputs_off():
    batch = PaddingFreeCollator(return_position_ids=False, return_flash_attn_kwargs=False)(
        [{"input_ids": e} for e in EXAMPLES]
    )
    assert set(batch) == {"input_ids", "labels"}


@pytest.mark.parametrize(
    "feats, error, match",
    [
        ([], ValueError, "empty batch"),
        ([{"labels": [1]}], KeyError, "example 0 has no `input_ids`"),
        ([{"input_ids": [1]}, {"input_ids": []}], ValueError, "example 1 has no tokens"),
        ([{"input_ids": [1, 2], "labels": [1]}], ValueError, "same length"),
        ([{"input_ids": [[1, 2]]}], ValueError, "nested"),
        ([{"input_ids": "abc"}], TypeError, "must be a list"),
    ],
)
def test_bad_input_errors(feats, error, match):
    with pytest.raises(error, match=match):
        PaddingFreeCollator()(feats)

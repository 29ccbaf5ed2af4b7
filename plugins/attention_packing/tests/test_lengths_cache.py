"""compute_lengths / add_length_column on datasets, sequences and streaming data."""

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from accel_attention_packing import lengths as lengths_mod
from accel_attention_packing.lengths import add_length_column, compute_lengths
from accel_attention_packing.multipack import MultipackBatchSampler

SIZES = [3, 1, 7, 4, 9, 2]


def _dataset():
    return datasets.Dataset.from_dict(
        {"input_ids": [list(range(n)) for n in SIZES], "text": ["x"] * len(SIZES)}
    )


def test_lengths_of_a_dataset_and_of_its_views():
    ds = _dataset()
    assert compute_lengths(ds).tolist() == SIZES
    shuffled = ds.shuffle(seed=0)
    assert compute_lengths(shuffled).tolist() == [len(r["input_ids"]) for r in shuffled]
    picked = ds.select([4, 0])
    assert compute_lengths(picked).tolist() == [9, 3]
    kept = ds.filter(lambda r: len(r["input_ids"]) > 2)
    assert compute_lengths(kept).tolist() == [3, 7, 4, 9]


def test_second_call_is_served_from_cache(monkeypatch):
    ds = _dataset()
    first = compute_lengths(ds)
    calls = []
    monkeypatch.setattr(lengths_mod, "_arrow_lengths", lambda *a: calls.append(a))
    assert compute_lengths(ds) is first  # same fingerprint: no recomputation
    assert not calls
    assert not first.flags.writeable


def test_length_column_is_used_and_added():
    ds = add_length_column(_dataset())
    assert ds["length"][:] == SIZES
    assert add_length_column(ds) is ds
    ds = ds.map(lambda r: {"length": 1})  # the column wins over recounting input_ids
    assert compute_lengths(ds).tolist() == [1] * len(SIZES)


def test_sequence_and_tensor_rows():
    rows = [{"input_ids": torch.arange(n)} for n in SIZES]
    assert compute_lengths(rows).tolist() == SIZES
    sampler = MultipackBatchSampler.from_dataset(rows, max_tokens_per_rank=16)
    assert sorted(sum(list(sampler), [])) == list(range(len(SIZES)))


def test_streaming_datasets_are_rejected_with_explanation():
    stream = _dataset().to_iterable_dataset()
    with pytest.raises(TypeError, match="multipack needs the length of every example up front"):
        compute_lengths(stream)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"input_ids": [1]}

    with pytest.raises(TypeError, match="iterable/streaming"):
        compute_lengths(Stream())


def test_bad_columns_and_empty_examples():
    ds = _dataset()
    with pytest.raises(KeyError, match="column 'ids' not in the dataset"):
        compute_lengths(ds, "ids")
    with pytest.raises(TypeError, match="not a list of token ids"):
        compute_lengths(ds, "text")
    empty = datasets.Dataset.from_dict({"input_ids": [[1], []]})
    with pytest.raises(ValueError, match="example 1 of column 'input_ids' has 0 tokens"):
        compute_lengths(empty)
    with pytest.raises(KeyError, match="example 0 has no 'input_ids'"):
        compute_lengths([{"ids": [1]}])


def test_large_dataset_takes_the_vectorised_path(monkeypatch):
    """Arrow path: no Python loop over rows (100k rows); the row-by-row fallback must not run."""

    def no_row_loop(*args, **kwargs):
        raise AssertionError("compute_lengths fell back to a per-row Python loop")

    monkeypatch.setattr(lengths_mod, "_generic_lengths", no_row_loop)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, 100_000)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(sizes.sum(), np.int32)))
    ds = datasets.Dataset(pa.table({"input_ids": values})).shuffle(seed=1)
    out = compute_lengths(ds)
    assert out.sum() == sizes.sum()

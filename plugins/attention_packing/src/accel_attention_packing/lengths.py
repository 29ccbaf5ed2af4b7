"""Example lengths for multipack, computed once per dataset.

Packing needs the token count of every example before the first step. Reading a 1M-row
tokenized dataset row by row in Python takes minutes; the lengths of an Arrow list column
are one vectorised call. Results are cached by the dataset's fingerprint (which changes with
every transform, so a cached value is never stale), and a precomputed ``length`` column is
used as is, so later epochs and re-created samplers cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

LENGTH_COLUMN = "length"

_STREAMING_MESSAGE = (
    "multipack needs the length of every example up front, but {what} has no length (it is "
    "an iterable/streaming dataset). Load the data as a map-style dataset (e.g. "
    "`datasets.load_dataset(..., streaming=False)` or `Dataset.from_generator`), or turn "
    "multipack off and use padding-free batches alone."
)

_CACHE_SIZE = 8
_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()


def _is_hf_dataset(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the trainer
        return False
    return isinstance(dataset, datasets.Dataset)


def _check_not_streaming(dataset: Any) -> None:
    what = type(dataset).__name__
    try:
        import datasets

        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            raise TypeError(_STREAMING_MESSAGE.format(what=what))
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.utils.data import IterableDataset

        if isinstance(dataset, IterableDataset):
            raise TypeError(_STREAMING_MESSAGE.format(what=what))
    except ImportError:  # pragma: no cover
        pass
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(_STREAMING_MESSAGE.format(what=what))


def _validate(lengths: np.ndarray, source: str) -> np.ndarray:
    if lengths.size and lengths.min() < 1:
        bad = int(np.flatnonzero(lengths < 1)[0])
        raise ValueError(
            f"example {bad} of {source} has {int(lengths[bad])} tokens; multipack needs every "
            "example to have at least one token (filter empty examples out)"
        )
    return lengths


def _arrow_lengths(dataset: Any, column: str) -> np.ndarray:
    """Lengths of a list column of a ``datasets.Dataset`` without touching Python rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.data
    if column not in table.column_names:
        raise KeyError(
            f"column {column!r} not in the dataset (columns: {table.column_names}); pass the "
            "column holding token ids, e.g. column='input_ids'"
        )
    values = table.column(column)
    if not (
        pa.types.is_list(values.type)
        or pa.types.is_large_list(values.type)
        or pa.types.is_fixed_size_list(values.type)
    ):
        raise TypeError(
            f"column {column!r} has type {values.type}, not a list of token ids; tokenize the "
            "dataset first or pass the tokenized column"
        )
    lengths = pc.list_value_length(values)
    if lengths.null_count:
        first = int(np.flatnonzero(lengths.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"example {first} has no {column!r} (null); drop or fix it")
    out = lengths.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    indices = getattr(dataset, "_indices", None)  # set by select/shuffle/filter
    if indices is not None:
        out = out[indices.column(0).to_numpy(zero_copy_only=False)]
    return out


def compute_lengths(
    dataset: Any,
    column: str = "input_ids",
    *,
    num_proc: int | None = None,
    length_column: str = LENGTH_COLUMN,
) -> np.ndarray:
    """Return the number of tokens of every example as an int64 numpy array.

    Args:
        dataset: a ``datasets.Dataset`` (fast, cached path), or any map-style dataset /
            sequence whose items are mappings with ``column``. Streaming / iterable
            datasets are rejected with an explanation.
        column: the column of token ids.
        num_proc: processes for the generic (non-Arrow) path; the Arrow path needs none.
        length_column: a column that already holds lengths (e.g. added by
            :func:`add_length_column`); used directly when present.
    """
    _check_not_streaming(dataset)
    if _is_hf_dataset(dataset):
        if length_column in dataset.column_names:
            source = length_column
        else:
            source = column
        fingerprint = getattr(dataset, "_fingerprint", None)
        key = (str(fingerprint), source)
        if fingerprint is not None and key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        if source == length_column:
            lengths = np.asarray(dataset.with_format("numpy")[length_column], dtype=np.int64)
        else:
            lengths = _arrow_lengths(dataset, column)
        lengths = _validate(lengths, f"column {source!r}")
        lengths.setflags(write=False)
        if fingerprint is not None:
            _cache[key] = lengths
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return lengths
    return _validate(_generic_lengths(dataset, column, num_proc), f"column {column!r}")


def _row_length(row: Any, column: str, index: int) -> int:
    try:
        value = row[column]
    except (KeyError, TypeError, IndexError):
        raise KeyError(f"example {index} has no {column!r}; pass the column of token ids") from None
    if hasattr(value, "shape"):
        return int(value.shape[-1]) if len(value.shape) else 1
    return len(value)


def _lengths_chunk(args: tuple[Any, str, int, int]) -> list[int]:
    dataset, column, start, stop = args
    return [_row_length(dataset[i], column, i) for i in range(start, stop)]


def _generic_lengths(dataset: Sequence[Any], column: str, num_proc: int | None) -> np.ndarray:
    n = len(dataset)
    if not num_proc or num_proc <= 1 or n < 10_000:
        return np.asarray(_lengths_chunk((dataset, column, 0, n)), dtype=np.int64)
    from multiprocessing import get_context

    step = -(-n // num_proc)
    jobs = [(dataset, column, s, min(s + step, n)) for s in range(0, n, step)]
    with get_context("spawn").Pool(num_proc) as pool:
        parts = pool.map(_lengths_chunk, jobs)
    return np.asarray([x for part in parts for x in part], dtype=np.int64)


def add_length_column(
    dataset: Any,
    column: str = "input_ids",
    *,
    length_column: str = LENGTH_COLUMN,
) -> Any:
    """Return ``dataset`` (a ``datasets.Dataset``) with a ``length`` column added.

    The column travels with the dataset through later transforms (filter, shuffle, select),
    so samplers built on derived datasets read lengths instead of recomputing them. A
    dataset that already has the column is returned unchanged.
    """
    _check_not_streaming(dataset)
    if not _is_hf_dataset(dataset):
        raise TypeError(
            f"add_length_column needs a datasets.Dataset, got {type(dataset).__name__}; use "
            "compute_lengths for other datasets"
        )
    if length_column in dataset.column_names:
        return dataset
    lengths = compute_lengths(dataset, column, length_column=length_column)
    return dataset.add_column(length_column, np.asarray(lengths))

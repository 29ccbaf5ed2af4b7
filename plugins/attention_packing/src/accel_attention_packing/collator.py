"""Padding-free collation: a batch of examples becomes one row with no pad tokens.

Padding wastes compute on tokens that carry no signal; with long-tailed lengths most of a
padded batch can be padding. Flattening the batch into a single row removes that waste, as
long as attention does not cross example boundaries. The boundaries travel with the batch
in two forms that transformers already understands:

* ``position_ids`` restarting at 0 for each example (used by rotary / learned position
  embeddings, and by transformers to detect packing when no cache is present);
* ``cu_seq_lens_q/k`` and ``max_length_q/k`` (the flash-attn varlen keyword arguments,
  forwarded through ``**kwargs`` from ``model(**batch)`` down to the attention function).

Label convention (identical to ``transformers.DataCollatorWithFlattening``): the label of
the first token of every example is replaced by ``separator_id`` (-100). The causal loss
shifts labels by one, so this is exactly what stops the last token of one example from
being trained to predict the first token of the next. The first label of an example is
never predicted in a padded batch either, so losses match the padded batch token for token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def _as_int_list(value: Any, *, name: str, index: int) -> list[int]:
    """Convert a list / tuple / tensor / numpy array of token ids into a list of ints."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"example {index}: `{name}` must be a list, tuple, numpy array or 1-D tensor of ints, "
            f"got {type(value).__name__}"
        )
    if value and isinstance(value[0], (list, tuple)):
        raise ValueError(
            f"example {index}: `{name}` is nested (2-D); pass one example per feature, "
            "not an already batched tensor"
        )
    return list(value)


class PaddingFreeCollator:
    """Collate examples into ONE packed row without padding.

    Args:
        separator_id: label given to the first token of every example (default -100), so no
            token is trained to predict across an example boundary.
        return_position_ids: return ``position_ids`` restarting at 0 per example. Needed by
            every model with position embeddings; leave on.
        return_flash_attn_kwargs: return ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k``
            (python ints). The varlen attention of this package and flash-attn use them; a
            model such as GPTBigCode does not pass ``position_ids`` to its attention, so
            these are the only boundary information its attention sees.
        return_seq_idx: also return ``seq_idx`` (int32, shape (1, total)), the index of the
            example each token belongs to (some state-space / hybrid models consume it).
        use_completion_mask: when an example has no ``labels`` but has ``completion_mask``
            (TRL's completion-only format) or ``assistant_masks``, tokens where that mask is
            0 get label -100. Labels given explicitly are always kept as they are.

    Call with a list of mappings holding ``input_ids`` and optionally ``labels`` (lists,
    tuples, numpy arrays or 1-D tensors). Truncation to a maximum length must happen before
    collation. Returns a dict of tensors of batch dimension 1 (``input_ids``, ``labels``,
    ``position_ids`` as int64) plus the keyword arguments above; no ``attention_mask`` is
    returned, since transformers would treat a mask of ones as a single sequence.

    The model must run with ``use_cache=False`` during training (see
    ``accel_attention_packing.attention.disable_kv_cache``): with a cache present,
    transformers' own sdpa/eager paths do not detect packing.
    """

    def __init__(
        self,
        *,
        separator_id: int = IGNORE_INDEX,
        return_position_ids: bool = True,
        return_flash_attn_kwargs: bool = True,
        return_seq_idx: bool = False,
        use_completion_mask: bool = True,
    ) -> None:
        if not isinstance(separator_id, int):
            raise TypeError(f"separator_id must be an int, got {type(separator_id).__name__}")
        self.separator_id = separator_id
        self.return_position_ids = return_position_ids
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx
        self.use_completion_mask = use_completion_mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(separator_id={self.separator_id}, "
            f"return_position_ids={self.return_position_ids}, "
            f"return_flash_attn_kwargs={self.return_flash_attn_kwargs}, "
            f"return_seq_idx={self.return_seq_idx})"
        )

    def _labels_for(self, feature: Mapping[str, Any], ids: list[int], index: int) -> list[int]:
        """Labels of one example before the separator is applied."""
        if feature.get("labels") is not None:
            labels = _as_int_list(feature["labels"], name="labels", index=index)
            if len(labels) != len(ids):
                raise ValueError(
                    f"example {index}: `labels` has {len(labels)} entries but `input_ids` has "
                    f"{len(ids)}; they must have the same length (truncate both together)"
                )
            return labels
        if self.use_completion_mask:
            for key in ("completion_mask", "assistant_masks"):
                if feature.get(key) is not None:
                    mask = _as_int_list(feature[key], name=key, index=index)
                    if len(mask) != len(ids):
                        raise ValueError(
                            f"example {index}: `{key}` has {len(mask)} entries but `input_ids` "
                            f"has {len(ids)}; they must have the same length"
                        )
                    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        return list(ids)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not isinstance(features, Sequence) or isinstance(features, (str, bytes)):
            raise TypeError(
                f"PaddingFreeCollator expects a list of examples, got {type(features).__name__}"
            )
        if len(features) == 0:
            raise ValueError(
                "PaddingFreeCollator got an empty batch; the sampler yielded no example"
            )

        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        seq_idx: list[int] = []
        cu_seq_lens = [0]
        max_length = 0
        for index, feature in enumerate(features):
            if not isinstance(feature, Mapping) or "input_ids" not in feature:
                raise KeyError(
                    f"example {index} has no `input_ids`; every example must be a mapping with "
                    "`input_ids` (and optionally `labels`)"
                )
            ids = _as_int_list(feature["input_ids"], name="input_ids", index=index)
            n = len(ids)
            if n == 0:
                raise ValueError(
                    f"example {index} has no tokens; filter empty examples out of the dataset"
                )
            example_labels = self._labels_for(feature, ids, index)
            input_ids += ids
            labels.append(self.separator_id)
            labels += example_labels[1:]
            if self.return_position_ids:
                position_ids += range(n)
            if self.return_seq_idx:
                seq_idx += [index] * n
            cu_seq_lens.append(cu_seq_lens[-1] + n)
            max_length = max(max_length, n)

        batch: dict[str, Any] = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
        }
        if self.return_position_ids:
            batch["position_ids"] = torch.tensor([position_ids], dtype=torch.long)
        if self.return_seq_idx:
            batch["seq_idx"] = torch.tensor([seq_idx], dtype=torch.int32)
        if self.return_flash_attn_kwargs:
            cu = torch.tensor(cu_seq_lens, dtype=torch.int32)
            batch["cu_seq_lens_q"] = cu
            batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = max_length
            batch["max_length_k"] = max_length
        return batch

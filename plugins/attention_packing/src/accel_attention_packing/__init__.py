"""accel-attention-packing: padding-free batches, varlen attention without flash-attn, and
multipack batch sampling.

Submodules are imported on use, so importing this package stays cheap:

* :mod:`.collator` -- :class:`PaddingFreeCollator`
* :mod:`.attention` -- :func:`register_varlen_attention`, :func:`choose_attention_path`,
  :func:`disable_kv_cache`, :data:`VARLEN_ATTENTION_NAME`
* :mod:`.multipack` -- :class:`MultipackBatchSampler`, :func:`plan_epoch`
* :mod:`.lengths` -- :func:`compute_lengths`, :func:`add_length_column`

Wiring for a training run::

    register_varlen_attention()                        # explicit, idempotent
    impl, reason = choose_attention_path(model.config, device)
    model.set_attn_implementation(impl)                # or attn_implementation= at load
    disable_kv_cache(model)                            # packed rows need use_cache=False
    collate = PaddingFreeCollator()                    # after max_seq_length truncation
    # multipack (optional): one plan per epoch, each rank takes its own column
    sampler = MultipackBatchSampler(compute_lengths(train_dataset), num_replicas=world,
                                    rank=rank, max_tokens_per_rank=budget, seed=seed)
    loader = DataLoader(train_dataset, batch_sampler=sampler, collate_fn=collate)
    # per epoch: sampler.set_epoch(epoch); the loader is already sharded by rank, so it
    # must not be sharded again by accelerate; resume with sampler.load_state_dict(...)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PaddingFreeCollator": "collator",
    "VARLEN_ATTENTION_NAME": "attention",
    "AttentionChoice": "attention",
    "choose_attention_path": "attention",
    "disable_kv_cache": "attention",
    "is_varlen_attention_registered": "attention",
    "register_varlen_attention": "attention",
    "varlen_sdpa_attention_forward": "attention",
    "MultipackBatchSampler": "multipack",
    "PackingPlan": "multipack",
    "plan_epoch": "multipack",
    "add_length_column": "lengths",
    "compute_lengths": "lengths",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

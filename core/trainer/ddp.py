"""DDP's ``find_unused_parameters``: on only where a trainable parameter can go unused.

transformers turns it on whenever gradient checkpointing is off (and always for a PEFT
model), which costs an extra traversal of the autograd graph every step and makes every rank
print that it found no unused parameter. A parameter goes unused in a step only if its
module can be skipped by the forward pass; in the models accel trains that is a per-expert
module of a mixture of experts (``...experts.3.w1``, or LoRA on one), which a batch may route
no token to. Stacked expert weights (transformers' 3-D ``gate_up_proj``), routers, LoRA on
some layers only and frozen bases are reached every step, so for them the answer is off.

A model that skips trainable modules in some other way makes DDP stop with an error that
names ``find_unused_parameters``; ``--ddp_find_unused_parameters True`` is the fix, and a
value given by the user is always kept.
"""

from __future__ import annotations

import re
from typing import Any

#: a parameter under one expert of a list of experts (``experts.0.``, ``experts.12.``)
PER_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


def may_skip(name: str) -> bool:
    """Whether a step may leave the parameter called ``name`` without a gradient."""
    return PER_EXPERT.search(name) is not None


def find_unused_default(model: Any) -> bool:
    """True if any trainable parameter of ``model`` may go unused in a step."""
    return any(p.requires_grad and may_skip(n) for n, p in model.named_parameters())


def set_find_unused(args: Any, model: Any) -> None:
    """Fill in ``args.ddp_find_unused_parameters`` when the user left it unset."""
    if getattr(args, "ddp_find_unused_parameters", None) is None:
        args.ddp_find_unused_parameters = find_unused_default(model)

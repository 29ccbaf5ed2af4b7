"""Silence the import-time chatter of optional libraries, and nothing else.

A CPU-only (or non-Hopper) install prints lines nobody can act on while transformers and peft
import their optional integrations:

- torchao logs ``Failed to load .../torchao/_C_*.so`` for each CUDA kernel library it cannot
  load (logger ``torchao``, reached through ``transformers.quantizers``);
- torchao's enums registered with ``torch.utils._pytree.register_constant`` make torch log a
  deprecation warning per enum (logger ``torch.utils._pytree``);
- bitsandbytes, imported by ``peft``, logs ``Failed to load CPU gemm_4bit_forward from
  kernels-community`` when the optional ``kernels`` package is absent
  (logger ``bitsandbytes.backends.cpu.ops``);
- gptqmodel, imported by peft's LoRA layer dispatch just to ask whether a layer is a GPTQ
  layer, prints an ASCII-art banner plus environment notes through the ``logbar`` logger;
- transformers warns that ``is_gradient_checkpointing`` is deprecated whenever peft reads it.

Each is dropped by a logging filter that matches that exact message on that library's
logger (or a ``warnings`` filter on that exact deprecation), so every other warning of these
libraries still shows. gptqmodel reports only through ``logbar``, which it sets to INFO when
first used, so that logger is disabled; GPTQ errors still raise. ``ACCEL_LIBRARY_LOGS=1``
turns all of this off.
"""

from __future__ import annotations

import logging
import os
import warnings

_INSTALLED = False

# (logger, start of the message) of records that are dropped
NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)


class _DropMessages(logging.Filter):
    """Drops records whose unformatted message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_library_noise() -> None:
    """Install the filters (idempotent, cheap: imports no library)."""
    global _INSTALLED
    if _INSTALLED or os.environ.get("ACCEL_LIBRARY_LOGS", "").lower() in ("1", "true", "yes"):
        return
    _INSTALLED = True
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in NOISE:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    logging.getLogger("logbar").disabled = True
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )

"""How a run ended: completed, invalid (out of memory) or failed (any other error).

The reference's rules (``ado-sfttrainer-experiments.md``, "is_valid logic"): runs raising
``torch.cuda.OutOfMemoryError`` or ``RuntimeError: CUDA error: an illegal memory access was
encountered`` are *invalid* (the entity does not fit the device); any other exception
(e.g. a ``RuntimeError`` containing ``NCCL Error``) is *failed*: no properties are recorded and
the run is repeated the next time the matrix runs.

On a CPU machine the same question is "did host memory run out": torch's
``DefaultCPUAllocator: can't allocate memory``, Python's ``MemoryError``, ``ENOMEM`` from
the operating system, and a worker killed by SIGKILL without a word (the kernel's OOM killer)
count as out of memory too.
"""

from __future__ import annotations

import signal

COMPLETED = "completed"
INVALID = "invalid"
FAILED = "failed"

OOM_TYPES = ("OutOfMemoryError", "MemoryError")
OOM_MESSAGES = (
    "CUDA error: an illegal memory access was encountered",
    "CUDA out of memory",
    "can't allocate memory",
    "Cannot allocate memory",
    "out of memory",
)


def is_out_of_memory(error_type: str, message: str) -> bool:
    """Whether an exception (its class name, qualified or not, and message) means the run
    ran out of device or host memory."""
    name = error_type.rsplit(".", 1)[-1]
    return name in OOM_TYPES or any(m in message for m in OOM_MESSAGES)


def killed_by_oom_killer(returncode: int | None, log_tail: str = "") -> bool:
    """A worker that died of SIGKILL without reporting: ``-9`` (or 137 through a shell), or
    torchrun's report of a rank killed by signal 9."""
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return True
    return bool(returncode) and "Signal 9 (SIGKILL)" in log_tail

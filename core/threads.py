"""CPU thread defaults that stay fast when anything else runs on the machine.

torch's OpenMP runtime (libgomp) starts one thread per core, and those threads spin while
they wait for work. Beside a single other busy process on a small machine they spin against
it at every small op, and a short CPU run gets an order of magnitude slower. With the wait
policy ``PASSIVE`` waiting threads sleep instead, and with one thread per core *per process
on this node* several processes do not oversubscribe the cores.

Both variables are read once, when the OpenMP runtime loads (at ``import torch``), so
:func:`configure` must run before torch is imported: the ``accel`` command and the test
suite call it first thing. ``accel.train()`` calls it too; when torch is already imported by
then, only the thread count can still change (``torch.set_num_threads``), the wait policy
stays what it was, and :func:`describe` says so.

The user's own settings always win: an ``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` already in
the environment is kept as it is. ``ACCEL_CPU_THREADS=N`` picks the thread count,
``ACCEL_CPU_THREADS=off`` leaves torch's and OpenMP's own defaults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

#: the switch: unset/"auto" = accel's defaults, an integer = that many threads, "off" = none
SWITCH = "ACCEL_CPU_THREADS"
#: the OMP_* names a launcher (``accel launch``) filled in with accel's defaults for its
#: workers, comma-separated: they are accel's choice, not the user's
FILLED_BY_LAUNCHER = "ACCEL_THREADS_FILLED_IN"


@dataclass(frozen=True)
class ThreadSetting:
    """What a process runs with, and who chose it (shown in the training summary)."""

    threads: str
    wait_policy: str
    chosen_by: str
    #: the variables accel itself put in the environment (a launcher redoes them per worker)
    filled_in: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.threads} per process, OMP_WAIT_POLICY={self.wait_policy} ({self.chosen_by})"


_SETTING: ThreadSetting | None = None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def processes_on_node(environ: MutableMapping[str, str]) -> int:
    """Processes of this launch on this machine (torchrun / accelerate set these)."""
    for name in ("LOCAL_WORLD_SIZE", "ACCEL_LOCAL_PROCESSES"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_threads(processes: int = 1) -> int:
    """The usable cores shared among the processes on this node, less one left for the rest
    of the machine: on 2 cores, 1 thread (measured in benchmarks/cpu/threads_cpu.md: idle
    1.3x torch's default, beside a busy process 2.5-30x faster than it); never below 1."""
    return max(1, usable_cores() // max(1, processes) - 1)


def environment_for(
    environ: MutableMapping[str, str], processes: int = 1
) -> MutableMapping[str, str]:
    """Fill in accel's thread defaults in ``environ`` (in place, returned): for this process
    or for a launch of ``processes`` processes on this node. Values already there win."""
    switch = environ.get(SWITCH, "auto").strip().lower()
    if switch == "off":
        return environ
    if switch.isdigit() and int(switch) > 0:
        environ.setdefault("OMP_NUM_THREADS", switch)
    else:
        environ.setdefault("OMP_NUM_THREADS", str(default_threads(processes)))
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environ


def configure(environ: MutableMapping[str, str] | None = None) -> ThreadSetting:
    """Apply the defaults to this process (before torch loads, where possible) and remember
    what was used. Idempotent: the first call decides."""
    global _SETTING
    if _SETTING is not None:
        return _SETTING
    env = os.environ if environ is None else environ
    launcher = env.get(FILLED_BY_LAUNCHER, "").split(",")
    user = {k: env[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in env}
    user = {k: v for k, v in user.items() if k not in launcher}
    switch = env.get(SWITCH, "auto").strip().lower()
    torch_loaded = "torch" in sys.modules
    if torch_loaded:
        _SETTING = _after_torch(env, user, switch)
        return _SETTING
    environment_for(env, processes_on_node(env))
    if switch == "off":
        chosen = f"{SWITCH}=off: torch's and OpenMP's defaults"
    elif user:
        chosen = "your " + ", ".join(sorted(user))
    else:
        chosen = "accel's defaults"
    _SETTING = ThreadSetting(
        env.get("OMP_NUM_THREADS", "torch default"),
        env.get("OMP_WAIT_POLICY", "OpenMP default"),
        chosen,
        tuple(k for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in env and k not in user),
    )
    return _SETTING


def _after_torch(env: MutableMapping[str, str], user: dict[str, str], switch: str) -> ThreadSetting:
    """torch was imported first: its OpenMP runtime has read the environment already."""
    import torch

    policy = env.get("OMP_WAIT_POLICY", "OpenMP default")
    late = "torch was imported before accel: the wait policy could not be set"
    if switch == "off" or "OMP_NUM_THREADS" in user:
        return ThreadSetting(str(torch.get_num_threads()), policy, late)
    wanted = int(switch) if switch.isdigit() and int(switch) > 0 else None
    wanted = wanted or default_threads(processes_on_node(env))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return ThreadSetting(str(wanted), policy, late)


def describe() -> str:
    """The setting in effect, for the training summary."""
    return str(_SETTING if _SETTING is not None else configure())

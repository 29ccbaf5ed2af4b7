"""What a compiled kernel uses on its target, and whether that is within the limits.

Registers, stack, local and static shared memory come from the cubin
(``cuobjdump --dump-resource-usage``, bundled with Triton); spill bytes from the ptxas log of
the compile itself (``ptxas -v``, rerun on the PTX when the compile was a cache hit); the
dynamic shared memory from Triton's launch metadata (the bytes it asks for at every launch).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

from .standin import SHARED_PER_BLOCK

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
MAX_REGISTERS = 255
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
#: registers are handed to warps in units of 256 (8 per thread)
REGISTER_UNIT = 8
#: spill bytes (stores + loads, per thread) a kernel may have; every kernel is held to zero
SPILL_BUDGET = 0


@dataclass
class Usage:
    registers: int
    stack: int
    local: int
    shared: int  # bytes per block: static (cubin) + dynamic (Triton's launch size)
    spill_stores: int
    spill_loads: int
    num_warps: int
    num_stages: int

    @property
    def spill(self) -> int:
        return self.spill_stores + self.spill_loads


def blocks_per_sm(registers: int, num_warps: int) -> int:
    """Blocks of ``num_warps`` warps that fit on one SM by registers (and by thread count)."""
    per_thread = -(-max(registers, 1) // REGISTER_UNIT) * REGISTER_UNIT
    threads = 32 * num_warps
    return min(REGISTERS_PER_SM // (per_thread * threads), MAX_THREADS_PER_SM // threads, 32)


def _resource_line(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def _ptxas_log(ptx: str, capability: int) -> str:
    """``ptxas -v`` on the PTX, for a kernel whose compile log is not at hand."""
    tool = "ptxas-blackwell" if capability >= 100 else "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        cmd = [os.path.join(_BIN, tool), "-v", f"--gpu-name={arch}", src, "-o", src + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def read_usage(compiled, ptxas_log: str, capability: int) -> Usage:
    """The resources of one Triton ``CompiledKernel`` compiled for ``sm_<capability>``."""
    res = _resource_line(compiled.asm["cubin"])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if spills is None:
        log = _ptxas_log(compiled.asm["ptx"], capability)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    md = compiled.metadata
    return Usage(
        registers=res["REG"],
        stack=res["STACK"],
        local=res["LOCAL"],
        shared=res["SHARED"] + int(md.shared),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        num_warps=int(md.num_warps),
        num_stages=int(md.num_stages),
    )


def problems(usage: Usage, capability: int, min_blocks: int | None = None) -> list[str]:
    """Why this kernel is not fit to launch well on the target; empty when it is."""
    found = []
    limit = SHARED_PER_BLOCK[capability]
    if usage.shared > limit:
        found.append(f"shared {usage.shared} B > {limit} B")
    if usage.registers > MAX_REGISTERS:
        found.append(f"{usage.registers} registers > {MAX_REGISTERS}")
    if usage.spill > SPILL_BUDGET:
        found.append(f"spills {usage.spill} B > {SPILL_BUDGET} B")
    if min_blocks is not None:
        blocks = blocks_per_sm(usage.registers, usage.num_warps)
        if blocks < min_blocks:
            found.append(f"{blocks} block/SM < {min_blocks}")
    return found

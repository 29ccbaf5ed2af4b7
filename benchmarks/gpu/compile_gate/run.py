"""Compile every case for one target and judge each launch: the work of one process."""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    """One kernel specialization compiled for one target (or one case that failed)."""

    op: str
    kernel: str
    configs: list[str]
    target: int
    dtype: str
    meta: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    blocks_per_sm: int | None = None
    problems: list[str] = field(default_factory=list)
    key: str = ""  # the compiled kernel's hash: rows with one key are one binary

    @property
    def ok(self) -> bool:
        return not self.problems


def run_target(capability: int, quick: bool, ops: tuple[str, ...] = ()) -> list[dict]:
    """Every case of the matrix (of ``ops``, default all) compiled for ``sm_<capability>``;
    rows as plain dicts."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["ACCEL_KERNEL_IMPL"] = "triton"
    from .cases import DTYPES, all_cases
    from .resources import blocks_per_sm, problems, read_usage
    from .standin import CompileFailed, stand_in_gpu

    rows: list[Row] = []
    usage_of: dict[str, object] = {}
    for case in all_cases(quick):
        if ops and case.op not in ops:
            continue
        failure = None
        with stand_in_gpu(capability) as gpu:
            try:
                case.call(gpu, DTYPES[case.dtype])
            except CompileFailed as error:
                failure = (error.kernel, f"compile error: {error}")
            except Exception as error:  # a wrapper that raises for a realistic shape
                where = traceback.extract_tb(error.__traceback__)[-1]
                failure = (
                    "(wrapper)",
                    f"raised {type(error).__name__}: {error} "
                    f"({os.path.basename(where.filename)}:{where.lineno})",
                )
        for launch in gpu.launches:
            key = launch.compiled.hash
            if key not in usage_of:
                usage_of[key] = read_usage(launch.compiled, launch.ptxas_log, capability)
            usage = usage_of[key]
            rows.append(
                Row(
                    op=case.op,
                    kernel=launch.kernel,
                    configs=[case.config],
                    target=capability,
                    dtype=case.dtype,
                    meta=" ".join(f"{k}={int(v)}" for k, v in launch.meta.items()),
                    registers=usage.registers,
                    spill_stores=usage.spill_stores,
                    spill_loads=usage.spill_loads,
                    shared=usage.shared,
                    num_warps=usage.num_warps,
                    num_stages=usage.num_stages,
                    blocks_per_sm=blocks_per_sm(usage.registers, usage.num_warps),
                    problems=problems(usage, capability, case.min_blocks),
                    key=key,
                )
            )
        if failure is not None:
            kernel, message = failure
            rows.append(
                Row(case.op, kernel, [case.config], capability, case.dtype, problems=[message])
            )
    return [asdict(r) for r in rows]

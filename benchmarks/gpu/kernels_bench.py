"""Per-kernel time and achieved bandwidth of accel's ops against torch eager, torch.compile and
Liger-Kernel, forward + backward, on realistic model shapes (one CUDA device).

    python benchmarks/gpu/kernels_bench.py --out results/kernels.json [--csv results/kernels.csv]
    python benchmarks/gpu/kernels_bench.py --dry-run --out /tmp/k.json   # CPU, tiny shapes

Each case is one op at one shape and dtype, timed as forward + backward (upstream gradient of
ones) by each implementation:

- ``accel``: the public op (``accel_fused_ops`` / ``accel_moe``), which runs its Triton kernel
  on CUDA tensors;
- ``eager``: the op's named PyTorch reference (the transformers formula the tests compare to);
- ``compile``: ``torch.compile`` of that reference (compile time excluded: warm-up calls);
- ``liger``: Liger-Kernel's functional op, where it has one (skipped with the reason when
  ``liger_kernel`` is not importable or there is no CUDA device).

Reported per implementation: median milliseconds over the timed repeats with the min and max,
nominal bytes moved (forward: inputs + outputs; backward: upstream gradient + inputs + input
gradients) over the median time as GB/s and as a fraction of the H100's ~3.35 TB/s, nominal
TFLOP/s for the matrix-product ops, the peak extra device memory of one call, and the largest
absolute difference of the forward output from ``eager`` (a sanity check; the tests hold the
tolerances). Results are rewritten after every case (a temp file renamed into place), so an
interrupted run still leaves every finished case; ``--budget-s`` stops starting new cases once
that many seconds have passed (the first shape of every op runs before any second shape).

``--dry-run`` runs the same code on CPU with tiny shapes: the Triton kernels under
``TRITON_INTERPRET=1``, ``torch.compile`` with the ``eager`` backend (no code generation), few
repeats, every case whatever ``--budget-s`` says. Its numbers mean nothing; it keeps the
script from rotting in CI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

H100_BYTES_PER_S = 3.35e12

# Shapes from the models the kernels serve: hidden 2048 (1B), 4096 (8B), 8192 (70B); vocab 32k
# (Llama 2) and 128k (Llama 3); MoE 8 experts top-2 (Mixtral) and 64 top-8 (OLMoE).
# ``tokens`` is one micro-batch of 8 x 1024 (4 x 2048) positions.
GPU_CASES: list[tuple[str, dict[str, int]]] = [
    ("rms_norm", {"tokens": 8192, "hidden": 4096}),
    ("swiglu", {"tokens": 8192, "inter": 14336}),
    ("geglu", {"tokens": 8192, "inter": 14336}),
    ("rope", {"batch": 4, "seq": 2048, "q_heads": 32, "kv_heads": 8, "head_dim": 128}),
    ("cross_entropy", {"tokens": 8192, "vocab": 128256}),
    ("fused_linear_cross_entropy", {"tokens": 8192, "hidden": 4096, "vocab": 128256}),
    ("fused_lora", {"tokens": 8192, "in": 4096, "out": 4096, "rank": 16}),
    ("moe_scattered_linear", {"tokens": 8192, "experts": 8, "top_k": 2, "in": 4096, "out": 14336}),
    # second shapes: run when the budget allows
    ("rms_norm", {"tokens": 8192, "hidden": 8192}),
    ("rms_norm", {"tokens": 8192, "hidden": 2048}),
    ("swiglu", {"tokens": 8192, "inter": 5632}),
    ("cross_entropy", {"tokens": 8192, "vocab": 32000}),
    ("fused_linear_cross_entropy", {"tokens": 8192, "hidden": 2048, "vocab": 32000}),
    ("rope", {"batch": 4, "seq": 2048, "q_heads": 64, "kv_heads": 8, "head_dim": 128}),
    ("moe_scattered_linear", {"tokens": 8192, "experts": 64, "top_k": 8, "in": 2048, "out": 1024}),
]
DRY_CASES: list[tuple[str, dict[str, int]]] = [
    ("rms_norm", {"tokens": 16, "hidden": 96}),
    ("swiglu", {"tokens": 16, "inter": 80}),
    ("geglu", {"tokens": 16, "inter": 80}),
    ("rope", {"batch": 1, "seq": 8, "q_heads": 2, "kv_heads": 1, "head_dim": 16}),
    ("cross_entropy", {"tokens": 16, "vocab": 200}),
    ("fused_linear_cross_entropy", {"tokens": 16, "hidden": 32, "vocab": 200}),
    ("fused_lora", {"tokens": 16, "in": 32, "out": 48, "rank": 4}),
    ("moe_scattered_linear", {"tokens": 16, "experts": 4, "top_k": 2, "in": 32, "out": 48}),
]
#: ops whose cost is matrix products: TFLOP/s is the figure to read, not GB/s
MATMUL_OPS = {"fused_linear_cross_entropy", "fused_lora", "moe_scattered_linear"}


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass
class Problem:
    """One op at one shape: fresh leaf inputs, the callables per implementation, nominal FLOPs."""

    inputs: Callable[[], list[Any]]
    impls: dict[str, Callable[..., Any]]
    flops: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the ops


def _rand(shape, dtype, device, grad=True, scale=1.0):
    import torch

    t = (torch.randn(shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _liger(name: str) -> Callable[..., Any]:
    """Liger-Kernel's functional op ``name``; raises Skip when it cannot run here."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("Liger-Kernel's ops are Triton kernels for CUDA; no CUDA device here")
    try:
        from liger_kernel.transformers import functional
    except Exception as err:  # not installed, or an import error of its own
        raise Skip(f"liger_kernel is not importable: {type(err).__name__}: {err}") from None
    return getattr(functional, name)


def _compiled(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    import torch

    return torch.compile(fn, backend=backend, dynamic=False)


def build(op: str, shape: dict[str, int], dtype, device, backend: str) -> Problem:
    """The problem of ``op`` at ``shape`` (see GPU_CASES for the keys)."""
    import torch
    import torch.nn.functional as F

    if op == "rms_norm":
        from accel_fused_ops.kernels.rms_norm import rms_norm, rms_norm_reference

        n, d = shape["tokens"], shape["hidden"]

        def eager(x, w):
            return rms_norm_reference(x, w, 1e-6)

        return Problem(
            inputs=lambda: [_rand((n, d), dtype, device), _rand((d,), dtype, device)],
            impls={
                "accel": lambda x, w: rms_norm(x, w, 1e-6),
                "eager": eager,
                "compile": _compiled(eager, backend),
                "liger": lambda x, w: _liger("liger_rms_norm")(x, w, 1e-6, in_place=False),
            },
        )
    if op in ("swiglu", "geglu"):
        from accel_fused_ops.kernels.swiglu import gated_activation_reference, geglu, swiglu

        n, f = shape["tokens"], shape["inter"]

        def eager(g, u):
            return gated_activation_reference(g, u, op, "tanh")

        ours = swiglu if op == "swiglu" else (lambda g, u: geglu(g, u, "tanh"))
        return Problem(
            inputs=lambda: [_rand((n, f), dtype, device), _rand((n, f), dtype, device)],
            impls={
                "accel": ours,
                "eager": eager,
                "compile": _compiled(eager, backend),
                "liger": lambda g, u: _liger(f"liger_{op}")(g, u),
            },
        )
    if op == "rope":
        from accel_fused_ops.kernels.rope import apply_rotary_pos_emb, rope_reference

        b, s, hq, hk, hd = (shape[k] for k in ("batch", "seq", "q_heads", "kv_heads", "head_dim"))

        def inputs():
            pos = torch.arange(s, dtype=torch.float32)
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            angles = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None].expand(b, s, hd)
            cos = angles.cos().to(device=device, dtype=dtype)
            sin = angles.sin().to(device=device, dtype=dtype)
            return [
                _rand((b, hq, s, hd), dtype, device),
                _rand((b, hk, s, hd), dtype, device),
                cos,
                sin,
            ]

        return Problem(
            inputs=inputs,
            impls={
                "accel": apply_rotary_pos_emb,
                "eager": rope_reference,
                "compile": _compiled(rope_reference, backend),
                "liger": lambda q, k, c, si: _liger("liger_rope")(q, k, c, si),
            },
        )
    if op == "cross_entropy":
        from accel_fused_ops.kernels.cross_entropy import cross_entropy

        n, v = shape["tokens"], shape["vocab"]

        def eager(logits, labels):
            return F.cross_entropy(logits.float(), labels)

        def inputs():
            labels = torch.randint(0, v, (n,))
            labels[::7] = -100
            return [_rand((n, v), dtype, device, scale=3.0), labels.to(device)]

        return Problem(
            inputs=inputs,
            impls={
                "accel": cross_entropy,
                "eager": eager,
                "compile": _compiled(eager, backend),
                "liger": lambda logits, y: _liger("liger_cross_entropy")(logits, y),
            },
        )
    if op == "fused_linear_cross_entropy":
        from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy

        n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]

        def eager(hidden, weight, labels):
            return F.cross_entropy(F.linear(hidden, weight).float(), labels)

        def inputs():
            labels = torch.randint(0, v, (n,))
            labels[::7] = -100
            return [
                _rand((n, h), dtype, device),
                _rand((v, h), dtype, device, scale=h**-0.5),
                labels.to(device),
            ]

        return Problem(
            inputs=inputs,
            impls={
                "accel": fused_linear_cross_entropy,
                "eager": eager,
                "compile": _compiled(eager, backend),
                "liger": lambda hh, w, y: _liger("liger_fused_linear_cross_entropy")(hh, w, y),
            },
            flops=6.0 * n * h * v,
        )
    if op == "fused_lora":
        from accel_fused_ops.kernels.fused_lora import fused_lora_linear, fused_lora_reference

        n, i, o, r = shape["tokens"], shape["in"], shape["out"], shape["rank"]

        def inputs():
            base = torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype)
            base.weight.requires_grad_(False)
            return [
                _rand((n, i), dtype, device),
                base,
                _rand((r, i), dtype, device, scale=i**-0.5),
                _rand((o, r), dtype, device, scale=r**-0.5),
            ]

        def eager(x, base, a, b_):
            return fused_lora_reference(x, base.weight, None, a, b_, 2.0)

        return Problem(
            inputs=inputs,
            impls={
                "accel": lambda x, base, a, b_: fused_lora_linear(x, base, a, b_, 2.0),
                "eager": eager,
                "compile": _compiled(eager, backend),
                "liger": _no_liger("Liger-Kernel has no fused LoRA linear"),
            },
            # base forward + input gradient, LoRA forward + its three backward products
            flops=4.0 * n * i * o + 8.0 * n * r * (i + o),
        )
    if op == "moe_scattered_linear":
        from accel_moe.kernels.scatter_gemm import Routing, scattered_linear

        t, e, k, i, o = (shape[x] for x in ("tokens", "experts", "top_k", "in", "out"))

        def inputs():
            top = torch.rand(t, e).topk(k, dim=-1).indices.to(device)
            routing = Routing.sort(top, e)
            return [
                _rand((t, i), dtype, device),
                _rand((e, o, i), dtype, device, scale=i**-0.5),
                routing,
            ]

        def ours(x, w, routing):
            return scattered_linear(x, w, routing, gather=routing.tokens)

        def per_expert_loop(x, w, routing):
            """What a plain MoE block does: gather each expert's rows, one matmul each."""
            rows = x[routing.tokens]
            outs, start = [], 0
            for expert, count in enumerate(routing.counts.tolist()):
                outs.append(rows[start : start + count] @ w[expert].T)
                start += count
            return torch.cat(outs)

        return Problem(
            inputs=inputs,
            impls={
                "accel": ours,
                "eager": per_expert_loop,
                "compile": _no_liger(
                    "torch.compile of a loop over data-dependent expert counts recompiles per "
                    "routing; not a fair baseline"
                ),
                "liger": _no_liger(
                    "Liger-Kernel's fused MoE is a whole experts MLP (gate-up, SwiGLU, down), "
                    "not one grouped GEMM"
                ),
            },
            flops=6.0 * t * k * i * o,
        )
    raise ValueError(f"unknown op {op!r}")


def _no_liger(reason: str) -> Callable[..., Any]:
    def skip(*_: Any) -> Any:
        raise Skip(reason)

    return skip


# --------------------------------------------------------------------------- timing


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "loss") and isinstance(value.loss, torch.Tensor):
        return [value.loss]
    return []


def _nbytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _step(fn: Callable[..., Any], args: list[Any]) -> tuple[list[Any], int]:
    """One forward + backward; returns the outputs and the nominal bytes it moved."""
    import torch

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for a in leaves:
        a.grad = None
    outs = [o for o in _tensors(fn(*args)) if o.requires_grad]
    grads = [torch.ones_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    moved = _nbytes(inputs) + _nbytes(outs)  # forward
    moved += (
        _nbytes(grads) + _nbytes(inputs) + _nbytes([a.grad for a in leaves if a.grad is not None])
    )
    return outs, moved


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_impl(fn, args, device, warmup: int, repeats: int, max_s: float) -> dict[str, Any]:
    """Median/min/max milliseconds of ``fn`` forward + backward after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        _step(fn, args)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times: list[float] = []
    moved = 0
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < max_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            _, moved = _step(fn, args)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _, moved = _step(fn, args)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "repeats": len(times),
        "bytes": moved,
        "peak_extra_mb": None if peak is None else round(peak / 2**20, 1),
    }


def _max_diff(a: list[Any], b: list[Any]) -> float | None:
    if len(a) != len(b) or not a:
        return None
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel())


# --------------------------------------------------------------------------- driver


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


CSV_FIELDS = [
    "op", "shape", "dtype", "impl", "status", "ms", "ms_min", "ms_max", "repeats", "gb_per_s",
    "pct_h100_bw", "tflop_per_s", "speedup_vs_eager", "peak_extra_mb", "max_abs_diff", "reason",
]  # fmt: skip


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "shape": json.dumps(row["shape"], separators=(",", ":"))})
    return out.getvalue()


def run_case(op, shape, dtype, device, args) -> list[dict[str, Any]]:
    import torch

    dname = str(dtype).removeprefix("torch.")
    try:
        problem = build(op, shape, dtype, device, args.compile_backend)
    except Exception as err:
        return [_row(op, shape, dname, "accel", "failed", reason=f"{type(err).__name__}: {err}")]
    torch.manual_seed(0)
    inputs = problem.inputs()
    rows, reference = [], None
    for impl in ("eager", "accel", "compile", "liger"):
        fn = problem.impls[impl]
        try:
            outs, _ = _step(fn, inputs)
            measured = time_impl(fn, inputs, device, args.warmup, args.repeats, args.max_case_s)
        except Skip as why:
            rows.append(_row(op, shape, dname, impl, "skipped", reason=str(why)))
            continue
        except Exception as err:  # a failure of one implementation is a result, not a crash
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            rows.append(_row(op, shape, dname, impl, "failed", reason=reason))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if impl == "eager":
            reference = [o.detach() for o in outs]
        row = _row(op, shape, dname, impl, "ok", **measured)
        seconds = measured["ms"] / 1e3
        row["gb_per_s"] = round(measured["bytes"] / seconds / 1e9, 1)
        row["pct_h100_bw"] = round(100 * measured["bytes"] / seconds / H100_BYTES_PER_S, 1)
        if problem.flops:
            row["tflop_per_s"] = round(problem.flops / seconds / 1e12, 1)
        if reference is not None and impl != "eager":
            row["max_abs_diff"] = _max_diff([o.detach() for o in outs], reference)
        rows.append(row)
        del outs
    eager_ms = next((r["ms"] for r in rows if r["impl"] == "eager" and r["status"] == "ok"), None)
    for row in rows:
        if eager_ms and row.get("ms"):
            row["speedup_vs_eager"] = round(eager_ms / row["ms"], 2)
    return rows


def _row(op, shape, dtype, impl, status, reason="", **values) -> dict[str, Any]:
    return {"op": op, "shape": shape, "dtype": dtype, "impl": impl, "status": status,
            "reason": reason, **values}  # fmt: skip


def environment(device) -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
    }
    for name in ("triton", "transformers", "liger_kernel"):
        try:
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-"))
        except Exception:
            info[name] = None
    return info


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results (also what the script prints)."""
    head = "| op | shape | dtype | impl | ms (min-max) | GB/s | % H100 BW | TFLOP/s | vs eager | peak MB | note |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["status"] == "ok":
            ms = f"{r['ms']:.3f} ({r['ms_min']:.3f}-{r['ms_max']:.3f})"
            diff = r.get("max_abs_diff")
            note = "" if diff is None else f"max diff {diff:.3g}"
        else:
            ms, note = r["status"], r.get("reason", "")
        cells = [r["op"], shape, r["dtype"], r["impl"], ms, r.get("gb_per_s", ""),
                 r.get("pct_h100_bw", ""), r.get("tflop_per_s", ""), r.get("speedup_vs_eager", ""),
                 r.get("peak_extra_mb", ""), note]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON (rewritten per case)")
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI)")
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp32 (default bf16)")
    parser.add_argument("--ops", help="comma list: only these ops")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no case after this")
    parser.add_argument("--max-case-s", type=float, default=1.0, help="timed seconds per impl")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("ACCEL_KERNEL_IMPL", "triton")
        args.warmup, args.repeats = 1, 2
        args.budget_s = float("inf")  # a rot check: every op runs, however slow the CPU
        args.compile_backend = args.compile_backend or "eager"
    args.compile_backend = args.compile_backend or "inductor"

    import torch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    chosen = [dtypes[d.strip()] for d in args.dtypes.split(",")]
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    cases = DRY_CASES if args.dry_run else GPU_CASES
    if args.ops:
        wanted = set(args.ops.split(","))
        cases = [c for c in cases if c[0] in wanted]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "environment": environment(device),
        "dry_run": args.dry_run,
        "compile_backend": args.compile_backend,
        "h100_bytes_per_s": H100_BYTES_PER_S,
        "rows": [],
        "not_run": [],
    }
    for op, shape in cases:
        for dtype in chosen:
            if time.perf_counter() - started > args.budget_s:
                result["not_run"].append({"op": op, "shape": shape, "reason": "time budget"})
                continue
            result["rows"] += run_case(op, shape, dtype, device, args)
            result["seconds"] = round(time.perf_counter() - started, 1)
            _write_atomic(args.out, json.dumps(result, indent=1, default=str))
            if args.csv:
                _write_atomic(args.csv, to_csv(result["rows"]))
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write_atomic(args.out, json.dumps(result, indent=1, default=str))
    if args.csv:
        _write_atomic(args.csv, to_csv(result["rows"]))
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

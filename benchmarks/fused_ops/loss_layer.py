"""Loss-layer memory and time: transformers-style full logits vs fused linear cross-entropy.

Each (case, method) runs forward + backward of the loss layer alone in a fresh subprocess:

* ``hf``: ``logits = hidden @ weight.T`` in the model dtype, ``logits.float()``, then
  ``F.cross_entropy`` (what ``ForCausalLMLoss`` does);
* ``fused``: :func:`accel_fused_ops.kernels.linear_cross_entropy.fused_linear_cross_entropy`
  (PyTorch path on CPU, Triton CE kernel on CUDA);
* ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (``impl="torch_compile"`` on CPU: the
  full logits, then Inductor-fused cross-entropy; its default ``cce`` Triton impl on CUDA);
* ``torchtune``: torchtune's ``CEWithChunkedOutputLoss`` (8 token chunks of logits, each
  chunk's upcast + cross-entropy compiled, as torchtune recommends). Its ``modules.loss``
  package does not import with the torchao this environment has, so the one file
  ``ce_chunked_output_loss.py`` is loaded on its own;
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton; CUDA only: on CPU it
  runs only in the Triton interpreter, orders of magnitude too slow for these shapes, so the
  row says skipped with that reason).

Peers are optional benchmark dependencies (``requirements/bench.txt``); a peer that is not
installed or cannot run here is reported as skipped with the reason.

Peak memory (CPU): after the inputs exist, the worker records its resident set size, resets
the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads ``VmHWM`` after
backward; the difference is every page the loss layer touched at its peak, gradients
included. A fresh process per run keeps allocator caches of one method out of the other's
number. On CUDA the same is done with ``torch.cuda.max_memory_allocated``.

Both workers save loss and gradients; the parent reports their largest absolute differences.

Usage::

    python benchmarks/fused_ops/loss_layer.py                       # CPU-feasible default set
    python benchmarks/fused_ops/loss_layer.py --cases 4096:131072:16384 --device cuda \\
        --dtype bf16 --weight trainable
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CASES = ["2048:32768:4096", "2048:131072:2048", "4096:131072:1024", "2048:262144:1024"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------ worker side


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


class _PeakMeter:
    """Peak bytes above the starting point, for the CPU (RSS high-water mark) or CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        self.torch = torch
        self.method = "cuda max_memory_allocated"
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = _proc_status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:  # no permission: lifetime peak, an overestimate of the delta
            self.method = "ru_maxrss (lifetime peak)"

    def peak(self) -> int:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("ru_maxrss"):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


METHODS = ("hf", "fused", "cce", "torchtune", "liger")


class SkipMethod(Exception):
    """A peer that cannot run here; the message is the reason printed in the table."""


def _torchtune_chunked_loss():
    """torchtune's chunked CE class, from its one file (its package import needs torchao)."""
    import importlib.util

    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        raise SkipMethod("torchtune is not installed (pip install -r requirements/bench.txt)")
    path = Path(spec.submodule_search_locations[0]) / "modules" / "loss"
    path = path / "ce_chunked_output_loss.py"
    file_spec = importlib.util.spec_from_file_location("_tt_ce_chunked_output_loss", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.CEWithChunkedOutputLoss


def _loss_fn(method: str, chunk_size: int | None, device: str, budget_mib: int | None = None):
    import torch
    import torch.nn.functional as F

    if method == "hf":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if method == "fused":
        from accel_fused_ops.kernels.linear_cross_entropy import fused_linear_cross_entropy

        budget = budget_mib << 20 if budget_mib else None
        return lambda h, w, y: fused_linear_cross_entropy(
            h, w, y, chunk_size=chunk_size, memory_budget=budget
        )
    if method == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise SkipMethod(f"cut-cross-entropy is not importable: {e}") from None
        impl = "cce" if device == "cuda" else "torch_compile"
        return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl)
    if method == "torchtune":
        loss = _torchtune_chunked_loss()(num_output_chunks=8)
        loss.compute_cross_entropy = torch.compile(loss.compute_cross_entropy, dynamic=True)

        def tune(h, w, y):
            chunks = [F.linear(c, w) for c in h.unsqueeze(0).chunk(8, dim=1)]
            return loss(chunks, y.unsqueeze(0))

        return tune
    if method == "liger":
        if device != "cuda":
            raise SkipMethod(
                "Liger-Kernel's fused linear CE is Triton-only: no CUDA device here, and the "
                "Triton interpreter (TRITON_INTERPRET=1) is far too slow for these shapes"
            )
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            raise SkipMethod(f"liger-kernel is not importable: {e}") from None
        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: liger(w, h, y)
    raise ValueError(f"unknown method {method!r}")


def _worker(args: argparse.Namespace) -> None:
    import torch

    hidden_size, vocab, tokens = _parse_case(args.case)
    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device
    try:
        loss_fn = _loss_fn(args.method, args.chunk_size, device, args.memory_budget_mib)
    except SkipMethod as e:
        print(json.dumps({"skipped": str(e)}))
        return

    # Warm up thread pools, kernels and the peers' torch.compile graphs (dynamic shapes) on the
    # real hidden and vocabulary sizes with a few tokens, so no compile lands in the timing.
    for n in (64, 128):
        h = torch.randn(n, hidden_size, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(vocab, hidden_size, device=device, dtype=dtype)
        w.requires_grad_(args.weight == "trainable")
        loss_fn(h, w, torch.randint(0, vocab, (n,), device=device)).backward()
        del h, w

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(args.weight == "trainable")

    meter = _PeakMeter(device)
    walls, cpus, loss = [], [], None
    for i in range(args.repeat):
        if i:
            hidden.grad = weight.grad = loss = None
        wall0, cpu0 = time.perf_counter(), time.process_time()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
        if i == 0:
            peak = meter.peak()

    torch.save(
        {
            "loss": loss.detach().cpu(),
            "grad_hidden": hidden.grad.cpu(),
            "grad_weight": weight.grad.cpu() if weight.grad is not None else None,
        },
        args.save,
    )
    result = {"peak_bytes": peak, "seconds": min(walls), "cpu_seconds": min(cpus)}
    print(json.dumps({**result, "meter": meter.method}))


# ------------------------------------------------------------------------------ parent side


def _parse_case(case: str) -> tuple[int, int, int]:
    try:
        hidden, vocab, tokens = (int(x) for x in case.split(":"))
    except ValueError:
        raise SystemExit(
            f"--cases entry {case!r} must be HIDDEN:VOCAB:TOKENS, e.g. 2048:131072:4096"
        ) from None
    return hidden, vocab, tokens


def _run_worker(args, case: str, method: str, weight: str, save: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--case", case,
        "--method", method,
        "--weight", weight,
        "--dtype", args.dtype,
        "--device", args.device,
        "--save", str(save),
        "--repeat", str(args.repeat),
    ]  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.memory_budget_mib:
        cmd += ["--memory-budget-mib", str(args.memory_budget_mib)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "plugins" / "fused_ops" / "src"), env.get("PYTHONPATH", "")]
    )
    env.pop("ACCEL_KERNEL_IMPL", None)  # the default dispatch: torch on CPU, Triton on CUDA
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        if method != "hf":  # a peer that breaks here is reported, not fatal
            reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {"skipped": f"failed here: {reason}"}
        raise SystemExit(f"worker failed for {case} {method}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _max_abs_diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return (a.float() - b.float()).abs().max().item()


def _row(case: str, weight: str, method: str, res: dict, saved: dict) -> str:
    hidden, vocab, tokens = _parse_case(case)
    head = f"| {hidden} | {vocab} | {tokens} | {weight} | {method} "
    r = res[method]
    if "skipped" in r:
        return head + f"| skipped: {r['skipped']} |" + " |" * 7
    hf = res["hf"]
    diffs = [
        _max_abs_diff(saved["hf"][k], saved[method][k])
        for k in ("loss", "grad_hidden", "grad_weight")
    ]
    return (
        head
        + f"| {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / hf['peak_bytes']:.3f} "
        + f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} "
        + f"| {r['cpu_seconds'] / hf['cpu_seconds']:.2f} | "
        + " | ".join(f"{d:.2e}" if d == d else "-" for d in diffs)
        + " |"
    )


def _peer_versions() -> str:
    from importlib import metadata

    found = []
    for dist in ("cut-cross-entropy", "torchtune", "liger-kernel", "triton"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return ", ".join(found)


def _environment(args) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"- device: {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        f"- CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- dtype {args.dtype}, fused chunk_size {args.chunk_size or 'default'}, "
        f"memory_budget {f'{args.memory_budget_mib} MiB' if args.memory_budget_mib else 'default'}",
        f"- peers: {_peer_versions()}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="HIDDEN:VOCAB:TOKENS")
    parser.add_argument("--weight", choices=["frozen", "trainable", "both"], default="frozen")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument(
        "--memory-budget-mib", type=int, default=None, help="fused: memory_budget instead"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="hf always runs"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed runs per case (min taken; memory: 1st)"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    import torch

    weights = ["frozen", "trainable"] if args.weight == "both" else [args.weight]
    header = (
        "| hidden | vocab | tokens | lm_head | method | peak MiB | peak / HF | wall s "
        "| CPU s | CPU time / HF | max abs diff loss | grad hidden | grad weight |\n"
        "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows, meters = [], set()
    print(header, file=sys.stderr, flush=True)  # progress; the report goes to stdout
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            hidden, vocab, tokens = _parse_case(case)
            for weight in weights:
                res, saved = {}, {}
                for method in ["hf", *[m for m in args.methods if m != "hf"]]:
                    path = Path(tmp) / f"{method}.pt"
                    res[method] = _run_worker(args, case, method, weight, path)
                    if "skipped" not in res[method]:
                        meters.add(res[method]["meter"])
                        saved[method] = torch.load(path)
                        path.unlink()
                    row = _row(case, weight, method, res, saved)
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
                del saved
    elapsed = time.perf_counter() - total
    report = "\n".join(
        [
            _environment(args),
            f"- peak memory measured with: {', '.join(sorted(meters))}",
            f"- total wall time {elapsed:.0f} s",
            "- command: python benchmarks/fused_ops/loss_layer.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "",
            header,
            *rows,
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()

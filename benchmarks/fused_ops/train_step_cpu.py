"""Whole-model training step on CPU: fused_ops kernels on vs off (PyTorch paths).

A small but not trivial Llama (default: hidden 512, 4 layers, 8 heads, MLP 1376, vocab 32000,
sequence 512, batch 4, fp32) runs full fine-tuning steps (forward, backward, AdamW) with

* ``off``: the unpatched transformers model;
* ``on``: every fused_ops feature (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU);
* ``on-ce``: the same with ``fast_loss: cross_entropy`` (logits kept, CE kernel).

Each configuration runs in its own subprocesses (``--repeats`` of them, interleaved with the
other configurations; the best tokens/s is reported), so allocator caches and peak memory of
one do not leak into another. Reported per configuration: tokens/s (batch x sequence / median step
time after warm-up steps), the process's peak RSS (``VmHWM``: weights, AdamW state and the
step together), the step's peak above the steady state (RSS high-water mark reset with
``/proc/self/clear_refs`` after the warm-up, so it is what one step adds on top of weights,
gradients and optimizer state), and the largest relative difference of the per-step losses
from ``off`` (the same seeds and batches are used everywhere).

Usage::

    python benchmarks/fused_ops/train_step_cpu.py --out benchmarks/fused_ops/train_step_cpu.md
    python benchmarks/fused_ops/train_step_cpu.py --hidden 256 --layers 2 --steps 2   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "off": {},
    "on": {
        "fast_loss": True,
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": True,
        "fast_swiglu": True,
    },
    "on-ce": {
        "fast_loss": "cross_entropy",
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": True,
        "fast_swiglu": True,
    },
}


# ------------------------------------------------------------------------------ worker side


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def _worker(args: argparse.Namespace) -> None:
    import torch

    model = _build_model(args)
    settings = CONFIGS[args.config]
    applied = None
    if settings:
        from accel import apply_patches
        from accel_fused_ops.config import FusedOpsConfig
        from accel_fused_ops.rules import build_rules

        applied = apply_patches(model, build_rules(FusedOpsConfig(**settings), model))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(
        0, args.vocab, (args.steps + args.warmup, args.batch, args.seq), generator=g
    )

    losses, times = [], []
    hwm_before_reset, rss_before, can_reset = 0, 0, False
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            hwm_before_reset, rss_before = _status_kib("VmHWM"), _status_kib("VmRSS")
            can_reset = _reset_peak()
        start = time.perf_counter()
        out = model(input_ids=ids[step], labels=ids[step])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(out.loss.item())
        del out
        if step >= args.warmup:
            times.append(elapsed)
    hwm = _status_kib("VmHWM")
    result = {
        "config": args.config,
        "losses": losses,
        "step_seconds": times,
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
        # lifetime peak: before the reset (build + warm-up) or after it (timed steps)
        "peak_rss_bytes": max(hwm_before_reset, hwm) * 1024,
        "step_peak_bytes": (hwm - rss_before) * 1024 if can_reset else None,
        "patches": dict(applied.counts) if applied else {},
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


# ------------------------------------------------------------------------------ parent side


def _run(args: argparse.Namespace, config: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", config]
    for name in ("hidden", "intermediate", "layers", "heads", "vocab", "seq", "batch"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    env.pop("ACCEL_KERNEL_IMPL", None)  # default dispatch: the PyTorch paths on CPU
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _versions() -> str:
    from importlib import metadata

    names = ("torch", "transformers", "peft", "triton", "accel-core", "accel-fused-ops")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--repeats", type=int, default=2, help="processes per config (best tokens/s reported)"
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--note", default="", help="a line about the machine, for the report")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    runs: dict[str, list[dict]] = {config: [] for config in args.configs}
    for _ in range(args.repeats):  # interleaved, so a burst of load hits every config alike
        for config in args.configs:
            runs[config].append(_run(args, config))
            print(f"{config}: {runs[config][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    # speed: the best run (load from other processes only ever slows a run down);
    # memory and losses do not depend on load: the first run's
    results = {
        c: {**r[0], "tokens_per_s": max(x["tokens_per_s"] for x in r)} for c, r in runs.items()
    }
    spread = {c: [round(x["tokens_per_s"]) for x in r] for c, r in runs.items()}
    base = results.get("off")
    header = (
        "| config | tokens/s | vs off | peak RSS MiB | vs off | step peak over steady MiB "
        "| vs off | max rel loss diff vs off |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for config, r in results.items():
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        peak = r["peak_rss_bytes"] / base["peak_rss_bytes"] if base else float("nan")
        step = (
            r["step_peak_bytes"] / base["step_peak_bytes"]
            if base and r["step_peak_bytes"] and base["step_peak_bytes"]
            else float("nan")
        )
        diff = (
            max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"], strict=True))
            if base
            else float("nan")
        )
        step_mib = f"{r['step_peak_bytes'] / 2**20:.0f}" if r["step_peak_bytes"] else "-"
        rows.append(
            f"| {config} | {r['tokens_per_s']:.0f} | {speed:.2f}x "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} | {peak:.2f}x | {step_mib} | {step:.2f}x "
            f"| {diff:.1e} |"
        )
    command = shlex.join(
        [
            "python",
            "benchmarks/fused_ops/train_step_cpu.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    any_result = next(iter(results.values()))
    report = "\n".join(
        [
            "# fused_ops: whole training step on CPU",
            "",
            f"- date: {args.date}",
            f"- machine: {_cpu()}, {os.cpu_count()} cores, torch threads "
            f"{any_result['threads']}" + (f"; {args.note}" if args.note else ""),
            f"- load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}",
            f"- versions: python {platform.python_version()}, {_versions()}",
            f"- model: Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
            f"MLP {args.intermediate}, vocab {args.vocab}, fp32; batch {args.batch} x "
            f"{args.seq} tokens, every position labelled; AdamW",
            f"- timing: median of {args.steps} steps after {args.warmup} warm-up step(s), in "
            f"{args.repeats} process(es) per configuration run in turn; the best process is "
            f"reported (tokens/s of every process: {spread})",
            f"- patches (on): {results.get('on', any_result)['patches']}",
            f"- total wall time {time.perf_counter() - started:.0f} s",
            f"- command: `{command}`",
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

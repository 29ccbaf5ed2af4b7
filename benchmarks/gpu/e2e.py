"""End-to-end training throughput and peak memory of a ~1B-parameter Llama with and without
accel's accelerations, through accel's own trainer (``accel.train``), on one CUDA device.

    python benchmarks/gpu/e2e.py --out results/e2e.json [--steps 30]
    python benchmarks/gpu/e2e.py --dry-run --out /tmp/e2e.json      # CPU, tiny model (CI)

The model is built from a config (TinyLlama's shape: hidden 2048, intermediate 5632, 22 layers,
32 query / 4 key-value heads, vocab 32000; 1.1B parameters; random weights, nothing
downloaded) and saved once with the bench tokenizer (:mod:`accel_bench.models`). The data are
pretokenized rows of random token ids whose lengths follow a long-tailed distribution (mean
about a third of ``--max-len``), so padding costs what it costs on instruction data. Every
variant trains ``--steps`` optimizer steps in bf16 with the same seed, each in its own process
(``--worker``) so that its peak memory and its patches are its own:

- ``full``: full fine-tuning, no acceleration (the baseline);
- ``full+fast_kernels``: ``--fast_kernels True True True`` (fused linear cross-entropy,
  RMSNorm, RoPE kernels);
- ``full+fast_kernels+padding_free``: the same plus ``--padding_free huggingface``;
- ``lora``: LoRA r=16 on all linear layers, no acceleration;
- ``lora+fast_kernels+fused_lora``: plus ``--fused_lora plain True``;
- ``qlora+fast_kernels+fused_lora``: 4-bit NF4 base (bitsandbytes) with fused LoRA; skipped
  with the reason when bitsandbytes is not importable.

Reported per variant: ``train_tokens_per_s`` and ``dataset_tokens_per_s`` as the trainer's
summary gives them (whole run), the same over the steps after the first ``--warmup-steps``
(``steady_*``: Triton autotuning and allocator warm-up excluded), peak device memory
(``torch.cuda.max_memory_allocated``; peak RSS on CPU), first and final loss, wall seconds.
``--dry-run`` trains a 2-layer model for 3 steps on CPU, two variants by default
(:data:`DRY_VARIANTS`). Results are rewritten after every variant, so a run stopped by its time budget keeps what
finished; ``--budget-s`` starts no variant after that many seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: TinyLlama-1.1B's shape
GPU_MODEL = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
DRY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}
LORA = {"peft_method": "lora", "r": 16, "lora_alpha": 32, "target_modules": ["all-linear"]}
FAST = {"fast_kernels": [True, True, True]}
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "full+fast_kernels": dict(FAST),
    "full+fast_kernels+padding_free": {**FAST, "padding_free": ["huggingface"]},
    "lora": dict(LORA),
    "lora+fast_kernels+fused_lora": {**LORA, **FAST, "fused_lora": ["plain", True]},
    "qlora+fast_kernels+fused_lora": {
        **LORA,
        **FAST,
        "bnb_qlora": ["nf4"],
        "fused_lora": ["bitsandbytes", True],
    },
}
#: the dry run's default: one process start costs more than its training, so two variants that
#: between them take every acceleration's code path
DRY_VARIANTS = ("full+fast_kernels+padding_free", "lora+fast_kernels+fused_lora")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- set-up


def build_model(folder: Path, dims: dict[str, Any], max_len: int) -> dict[str, Any]:
    """Save a random-weight Llama of ``dims`` (bf16) and the bench tokenizer in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    from accel.testing import tiny_config
    from accel_bench.models import build_tokenizer

    config = tiny_config("llama", size="small", max_position_embeddings=max(max_len, 128), **dims)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    del model
    return {"parameters": params, **dims}


def write_dataset(path: Path, rows: int, max_len: int, vocab: int, seed: int = 0) -> dict:
    """Pretokenized rows of random ids (bos first), log-normal lengths in [16, max_len]."""
    rng = random.Random(seed)
    lengths = []
    with path.open("w") as fh:
        for _ in range(rows):
            n = int(min(max_len, max(16, rng.lognormvariate(math.log(max_len / 4), 0.8))))
            lengths.append(n)
            ids = [2] + [rng.randrange(4, vocab) for _ in range(n - 1)]
            fh.write(json.dumps({"input_ids": ids}) + "\n")
    return {"rows": rows, "mean_length": round(sum(lengths) / rows, 1), "max_length": max_len}


def train_args(model: Path, data: Path, out: Path, variant: dict, opts: argparse.Namespace) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not opts.dry_run
    return {
        "model_name_or_path": str(model),
        "training_data_path": str(data),
        "max_seq_length": opts.max_len,
        "per_device_train_batch_size": opts.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": opts.steps,
        "learning_rate": 1e-5,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "output_dir": str(out),
        "bf16": cuda,
        "torch_dtype": "bfloat16",
        "gradient_checkpointing": opts.gradient_checkpointing,
        "seed": 7,
        "disable_tqdm": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
        **({"use_cpu": True} if not cuda else {}),
        **variant,
    }


# --------------------------------------------------------------------------- one variant


def worker(spec_file: Path) -> int:
    """Train one variant (``spec_file`` holds its arguments), write ``result.json`` beside it."""
    import resource

    import torch
    import transformers.trainer as hf_trainer
    from transformers import TrainerCallback

    import accel

    spec = json.loads(spec_file.read_text())
    warmup = int(spec["warmup_steps"])

    class StepTimes(TrainerCallback):
        """Wall time and token counts at each optimizer step's end."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int, int]] = []
            self.tokens = [0, 0]

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                model.register_forward_pre_hook(self._count, with_kwargs=True)

        def _count(self, module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and ids is not None:
                mask = kwargs.get("attention_mask")
                self.tokens[0] += ids.numel()
                self.tokens[1] += int(mask.sum()) if mask is not None else ids.numel()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), *self.tokens))

    timer = StepTimes()
    hf_trainer.DEFAULT_CALLBACKS.append(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    outcome = accel.train(**spec["train"])
    result: dict[str, Any] = {"summary": outcome.summary}
    if len(timer.marks) > warmup + 1:
        (t0, k0, r0), (t1, k1, r1) = timer.marks[warmup], timer.marks[-1]
        result["steady_steps"] = len(timer.marks) - 1 - warmup
        result["steady_train_tokens_per_s"] = round((k1 - k0) / (t1 - t0), 1)
        result["steady_dataset_tokens_per_s"] = round((r1 - r0) / (t1 - t0), 1)
    if torch.cuda.is_available():
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        )
        result["peak_memory_kind"] = "peak RSS (CPU)"
    _write_atomic(spec_file.with_name("result.json"), json.dumps(result, default=str))
    return 0


def skip_reason(name: str) -> str | None:
    if name.startswith("qlora"):
        import importlib.util

        import torch

        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed"
        if not torch.cuda.is_available():
            return "QLoRA's 4-bit base runs its fused path on CUDA only in this benchmark"
    return None


def run_variant(
    name: str, work: Path, base: dict, opts: argparse.Namespace, timeout: float
) -> dict:
    folder = work / name.replace("+", "_")
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"train": base, "warmup_steps": opts.warmup_steps}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "timeout", "reason": f"stopped after {timeout:.0f} s", "log_tail": tail}
    seconds = round(time.perf_counter() - started, 1)
    (folder / "log.txt").write_text(done.stdout + done.stderr)
    result_file = folder / "result.json"
    if done.returncode != 0 or not result_file.is_file():
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        return {
            "status": "failed",
            "reason": lines[-1][:400] if lines else f"exit {done.returncode}",
            "log_tail": "\n".join(lines[-25:]),
            "seconds": seconds,
        }
    return {"status": "ok", "seconds": seconds, **json.loads(result_file.read_text())}


def table(result: dict[str, Any]) -> str:
    head = (
        "| variant | status | train tok/s | steady train tok/s | steady dataset tok/s | "
        "vs full (steady) | peak MB | final loss | seconds | note |"
    )
    lines = [head, "|" + "---|" * 10]
    rows = result["variants"]
    base = rows.get("full", {}).get("steady_train_tokens_per_s")
    base_lora = rows.get("lora", {}).get("steady_train_tokens_per_s")
    for name, r in rows.items():
        s = r.get("summary", {})
        ref = base_lora if name.startswith(("lora", "qlora")) else base
        steady = r.get("steady_train_tokens_per_s")
        ratio = f"{steady / ref:.2f}x" if steady and ref else ""
        cells = [
            name,
            r["status"],
            s.get("train_tokens_per_s", ""),
            steady or "",
            r.get("steady_dataset_tokens_per_s", ""),
            ratio,
            r.get("peak_memory_mb", ""),
            s.get("final_loss", ""),
            r.get("seconds", ""),
            r.get("reason", ""),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="results JSON (rewritten per variant)")
    parser.add_argument("--work", type=Path, help="model, data and runs (default: beside --out)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 3 steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no variant after")
    parser.add_argument("--variant-timeout-s", type=float, default=90.0)
    opts = parser.parse_args(argv)
    if opts.worker:
        return worker(opts.worker)
    if opts.out is None:
        parser.error("--out is required")
    if opts.dry_run:
        opts.steps, opts.warmup_steps, opts.batch_size, opts.max_len = 3, 1, 2, 32
    names = (
        opts.variants.split(",")
        if opts.variants
        else list(DRY_VARIANTS if opts.dry_run else VARIANTS)
    )
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    work = opts.work or opts.out.parent / "e2e-work"
    work.mkdir(parents=True, exist_ok=True)
    dims = DRY_MODEL if opts.dry_run else GPU_MODEL
    model_dir = work / "model"
    result: dict[str, Any] = {"dry_run": opts.dry_run, "steps": opts.steps, "variants": {}}
    result["model"] = build_model(model_dir, dims, opts.max_len)
    data = work / "train.jsonl"
    rows = opts.steps * opts.batch_size * 2
    result["data"] = write_dataset(data, rows, opts.max_len, dims["vocab_size"])
    result["settings"] = {
        "batch_size": opts.batch_size,
        "max_len": opts.max_len,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "warmup_steps": opts.warmup_steps,
    }
    for name in names:
        elapsed = time.perf_counter() - started
        reason = skip_reason(name)
        if reason is None and elapsed > opts.budget_s:
            reason = f"time budget ({opts.budget_s:.0f} s) spent"
        if reason:
            result["variants"][name] = {"status": "skipped", "reason": reason}
        else:
            args = train_args(model_dir, data, work / "runs" / name, VARIANTS[name], opts)
            timeout = min(opts.variant_timeout_s, max(30.0, opts.budget_s + 60 - elapsed))
            result["variants"][name] = run_variant(name, work, args, opts, timeout)
        result["seconds"] = round(time.perf_counter() - started, 1)
        _write_atomic(opts.out, json.dumps(result, indent=1, default=str))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

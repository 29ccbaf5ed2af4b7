"""CPU benchmark of accel-peft: base-weight memory, peak training RSS and tokens/s of
bf16 LoRA, the common QLoRA recipe (bitsandbytes + PEFT's prepare_model_for_kbit_training,
fp32 upcast included), accel QLoRA, accel QLoRA + fused LoRA + fast kernels, and GPTQ-LoRA
without and with fused LoRA + fast kernels,
side by side in one run on one Llama built from a config (random weights: speed and memory
do not depend on them).

Every configuration trains in its own process through ``accel.train`` (same data, batch,
sequence length, steps, LoRA all-linear r=16), so peak RSS is that run's own.

    python benchmarks/peft/bench_cpu.py --root /tmp/accel-peft-bench --steps 20 --repeats 3 \
        > benchmarks/peft/results_cpu.md

The report alone goes to stdout (quantization's progress output is sent to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "bf16 LoRA": {},
    "common QLoRA recipe (nf4, prepare_model_for_kbit_training)": {"bnb_qlora": ["nf4", True]},
    "accel QLoRA (nf4)": {"bnb_qlora": ["nf4"]},
    "accel QLoRA + fused LoRA + fast kernels": {
        "bnb_qlora": ["nf4"],
        "fast_kernels": [True, True, True],
        "fused_lora": ["bitsandbytes", True],
    },
    "accel GPTQ-LoRA (4-bit, group 128)": {"auto_gptq": ["triton_v2"]},
    "accel GPTQ-LoRA + fused LoRA + fast kernels": {
        "auto_gptq": ["triton_v2"],
        "fast_kernels": [True, True, True],
        "fused_lora": ["auto_gptq", True],
    },
}


def prepare(root: Path, args: argparse.Namespace) -> None:
    """The model (saved in bf16), a data file of ~``seq``-token rows, its GPTQ checkpoint."""
    import torch

    from accel.testing import save_tiny_model
    from accel.trainer.demo import make_examples

    model = root / "model"
    if not model.exists():
        save_tiny_model(
            model,
            "llama",
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            vocab_size=args.vocab,
            max_position_embeddings=2 * args.seq,
            dtype=torch.bfloat16,
        )
    examples = make_examples(64 * 12, seed=0)
    rows = []
    for i in range(0, len(examples), 12):
        chunk = examples[i : i + 12]
        rows.append(
            {
                "input": " ".join(e["input"] + " " + e["output"] for e in chunk[:-1]),
                "output": chunk[-1]["output"],
            }
        )
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (root / "gptq").exists():
        from accel_peft.quantize import quantize

        start = time.perf_counter()
        quantize(
            str(model),
            str(root / "gptq"),
            bits=4,
            group_size=128,
            calibration=str(root / "train.jsonl"),
            max_examples=32,
        )
        print(f"quantized in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def tensor_bytes(module, recurse: bool = True) -> int:
    """Parameters, buffers and bitsandbytes' quantization state of ``module``."""
    total = 0
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    for tensor in {id(t): t for t in tensors}.values():
        total += tensor.numel() * tensor.element_size()
    for sub in module.modules() if recurse else [module]:
        state = getattr(getattr(sub, "weight", None), "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if hasattr(value, "numel"):
                    total += value.numel() * value.element_size()
    return total


def base_bytes(model) -> tuple[int, int]:
    """Bytes of the whole frozen base, and of the decoder layers' linear layers (the ones
    that are quantized; embeddings, norms and the output layer stay in bf16)."""
    linears = sum(
        tensor_bytes(module)
        for name, module in model.named_modules()
        if ".layers." in name and name.rsplit(".", 1)[-1].endswith("_proj")
    )
    return tensor_bytes(model), linears


def measure_memory(root: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from accel_peft.loading import load_bnb_4bit, load_gptq

    out = {}
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.bfloat16)
    out["bf16"] = base_bytes(model)
    del model
    model = load_bnb_4bit(str(root / "model"), {"dtype": torch.bfloat16}, "nf4")
    out["nf4 (bitsandbytes)"] = base_bytes(model)
    del model
    model = load_gptq(str(root / "gptq"), {"dtype": torch.bfloat16})
    out["GPTQ 4-bit"] = base_bytes(model)
    return {k: (v[0] / 2**20, v[1] / 2**20) for k, v in out.items()}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM): unlike ``ru_maxrss``, it is not inherited from the
    parent across ``exec``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_one(root: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    import accel

    flags = CONFIGS[name]
    model = root / ("gptq" if "auto_gptq" in flags else "model")
    result = accel.train(
        model_name_or_path=str(model),
        training_data_path=str(root / "train.jsonl"),
        data_formatter_template="### Input: {{input}}\n### Response: {{output}}",
        response_template="### Response:",
        output_dir=str(root / "out" / name.split()[0]),
        torch_dtype="bfloat16",
        max_seq_length=args.seq,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        peft_method="lora",
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["all-linear"],
        **flags,
    )
    rss = peak_rss_mib()
    return {
        "tokens_per_s": result.summary["train_tokens_per_s"],
        "runtime_s": result.summary["runtime_s"],
        "peak_rss_mib": rss,
        "final_loss": result.summary["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/accel-peft-bench")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per configuration (order reversed each time)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(train_one(root, args.one, args)))
        return
    # gptqmodel's progress output goes to stdout: keep it out of the report
    with contextlib.redirect_stdout(sys.stderr):
        prepare(root, args)
        memory = measure_memory(root)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for repeat in range(args.repeats):
        order = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                runs[name].append({"error": done.stderr.strip().splitlines()[-1]})
                continue
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    report(args, memory, runs, load_before, load_after)


def cpu_description() -> str:
    """CPU model, core count and the matrix instructions bf16 matmuls can use (the
    development machines have been Intel Xeons with AMX and AMD EPYCs without)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {
        key.strip(): value.strip()
        for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)
    }
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no avx512_bf16/amx"]
    return f"{name}, {os.cpu_count()} cores, {' '.join(units)}"


def report(args, memory, runs, load_before, load_after) -> None:
    import bitsandbytes
    import gptqmodel
    import peft
    import torch
    import transformers

    from accel.testing import tiny_config

    config = tiny_config(
        "llama",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
    )
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    print("# accel-peft on CPU: memory and throughput\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- machine: {cpu_description()}")
    print(
        f"- load average (1/5/15 min) before the training runs: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{' '.join(f'{x:.2f}' for x in load_after)} (the machine is shared)"
    )
    print(
        f"- versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"gptqmodel {gptqmodel.__version__}"
    )
    print(
        f"- model: Llama from config, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}: {params / 1e6:.0f}M parameters, bf16"
    )
    print(
        f"- training: accel.train, batch {args.batch} x up to {args.seq} tokens, "
        f"{args.steps} steps, LoRA r=16 all-linear, torch_dtype bfloat16; each configuration "
        f"in its own process, {args.repeats} runs each in alternating order"
    )
    print(f"- command: `python benchmarks/peft/bench_cpu.py {' '.join(sys.argv[1:])}`\n")
    print("## Base weights in memory\n")
    print(
        "| base | whole model MiB | vs bf16 | decoder linear layers MiB | vs bf16 |\n"
        "|---|---|---|---|---|"
    )
    whole0, lin0 = memory["bf16"]
    for name, (whole, lin) in memory.items():
        print(f"| {name} | {whole:.1f} | {whole / whole0:.2f}x | {lin:.1f} | {lin / lin0:.2f}x |")
    print("\n## Training\n")
    print(
        "| configuration | tokens/s (best of runs) | all runs | vs common recipe | "
        "peak RSS MiB | final loss |"
    )
    print("|---|---|---|---|---|---|")

    def best(name: str) -> dict | None:
        ok = [r for r in runs[name] if "error" not in r]
        return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None

    common = best(next(k for k in CONFIGS if k.startswith("common")))
    for name in CONFIGS:
        run = best(name)
        if run is None:
            print(f"| {name} | failed: {runs[name][0]['error']} | | | | |")
            continue
        every = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[name] if "error" not in r)
        ratio = f"{run['tokens_per_s'] / common['tokens_per_s']:.2f}x" if common else ""
        print(
            f"| {name} | {run['tokens_per_s']:.1f} | {every} | {ratio} | "
            f"{run['peak_rss_mib']:.0f} | {run['final_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()

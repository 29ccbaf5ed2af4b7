"""CPU benchmark of accel-peft: base-weight memory, peak training RSS and tokens/s of
bf16 LoRA, the common QLoRA recipe (bitsandbytes + PEFT's prepare_model_for_kbit_training,
fp32 upcast included), accel QLoRA, accel QLoRA + fused LoRA + fast kernels, and GPTQ-LoRA,
side by side in one run on one Llama built from a config (random weights: speed and memory
do not depend on them).

Every configuration trains in its own process through ``accel.train`` (same data, batch,
sequence length, steps, LoRA all-linear r=16), so peak RSS is that run's own.

    python benchmarks/peft/bench_cpu.py --root /tmp/accel-peft-bench > benchmarks/peft/results_cpu.md
"""

from __future__ import annotations

import argparse
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


def base_bytes(model) -> int:
    """Bytes of the frozen base: parameters, buffers, and bitsandbytes' quantization state."""
    total = 0
    seen = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if hasattr(value, "numel"):
                    total += value.numel() * value.element_size()
    return total


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
    return {k: v / 2**20 for k, v in out.items()}


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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(train_one(root, args.one, args)))
        return
    prepare(root, args)
    memory = measure_memory(root)
    load_before = os.getloadavg()
    runs = {}
    for name in CONFIGS:
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            runs[name] = {"error": done.stderr.strip().splitlines()[-1]}
            continue
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    report(args, memory, runs, load_before, load_after)


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
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
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
        f"{args.steps} steps, LoRA r=16 all-linear, torch_dtype bfloat16"
    )
    print(f"- command: `python benchmarks/peft/bench_cpu.py {' '.join(sys.argv[1:])}`\n")
    print("## Base weights in memory\n")
    print("| base | MiB | vs bf16 |\n|---|---|---|")
    for name, mib in memory.items():
        print(f"| {name} | {mib:.1f} | {mib / memory['bf16']:.2f}x |")
    print("\n## Training\n")
    print("| configuration | tokens/s | vs common recipe | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|")
    base = runs.get(next(k for k in CONFIGS if k.startswith("common")), {}).get("tokens_per_s")
    for name, run in runs.items():
        if "error" in run:
            print(f"| {name} | failed: {run['error']} | | | |")
            continue
        ratio = f"{run['tokens_per_s'] / base:.2f}x" if base else ""
        print(
            f"| {name} | {run['tokens_per_s']:.1f} | {ratio} | {run['peak_rss_mib']:.0f} | "
            f"{run['final_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Cost of odm per training step on a model larger than the mixing benchmark's.

A Llama of hidden 256, 4 layers, vocabulary 8192 (8.9M parameters), three pretokenized
datasets of random ids (lengths 64-256), batches of 8: the same run with static uniform mixing
and with odm (train_loss, entropy). Reported: CPU time of this thread per step in
``training_step`` (forward + backward; it contains the reward, computed inside the model's
loss) and in odm's own code, as in ``mixing_cpu.py``: the reward (train_loss: the
per-example sums from the loss's own token losses; entropy: a second pass over the logits),
the EXP3 update + ``odm.jsonl`` line, the draws. CPU time, because the machine is shared.

    python benchmarks/odm/overhead_cpu.py --steps 30
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mixing_cpu  # noqa: E402  (its CPU timers)

MODEL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
}
VARIANTS = ("uniform", "odm_train_loss", "odm_entropy")


def write_data(root: Path) -> dict[str, Path]:
    files = {}
    for k, name in enumerate(("a", "b", "c")):
        rng = random.Random(k)
        rows = []
        for _ in range(200):
            ids = [rng.randrange(4, MODEL["vocab_size"]) for _ in range(rng.randrange(64, 257))]
            rows.append({"input_ids": [1, *ids, 2]})
        files[name] = mixing_cpu.write_jsonl(root / f"{name}.jsonl", rows)
    return files


def run(root: Path, variant: str, files: dict[str, Path], steps: int) -> dict:
    import yaml

    import accel

    mixing_cpu.TIMERS.clear()
    kind = "odm" if variant.startswith("odm") else "default"
    processor: dict = {"type": kind, "seed": 0}
    if kind == "odm":
        processor["odm"] = {"reward_type": variant.removeprefix("odm_")}
    datasets = [
        {"name": n, "data_paths": [str(p)], **({} if kind == "odm" else {"sampling": 1 / 3})}
        for n, p in files.items()
    ]
    cfg = root / f"{variant}.yaml"
    cfg.write_text(yaml.safe_dump({"dataprocessor": processor, "datasets": datasets}))
    args = {
        "model_name_or_path": str(root / "model"),
        "data_config": str(cfg),
        "output_dir": str(root / f"run-{variant}"),
        "per_device_train_batch_size": 8,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "resume_from_checkpoint": "false",
    }
    if kind == "odm":
        args["odm"] = ["train_loss"]
    accel.train(args)
    return {k: v / steps for k, v in mixing_cpu.TIMERS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="/tmp/odm-overhead")
    parser.add_argument("--report", default=str(Path(__file__).with_name("overhead_cpu.md")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy
    import torch
    import transformers

    from accel.testing import save_tiny_model

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model(root / "model", **MODEL)
    params = sum(
        p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model).parameters()
    )
    files = write_data(root)
    mixing_cpu.install_timers()
    load0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load")[-1]
    results = {v: run(root, v, files, args.steps) for v in VARIANTS}
    load1 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load")[-1]
    (root / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# odm cost per step (CPU)",
        "",
        f"- command: `python benchmarks/odm/overhead_cpu.py --steps {args.steps}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(uptime at start: {load0.strip()}; at end: {load1.strip()}), Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, numpy {numpy.__version__}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- model: Llama, hidden 256, 4 layers, 4 heads (2 kv), vocabulary 8192, "
        f"{params / 1e6:.1f}M parameters, fp32; 3 pretokenized datasets of 200 random rows "
        f"(65-258 tokens), batches of 8, padded; {args.steps} steps per variant",
        "- CPU time of this thread per step (ms); `training_step` holds the forward, the "
        "backward and the reward (computed inside the model's loss)",
        "",
        "| variant | training_step | reward | EXP3 update + log | draws | "
        "odm share of training_step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, t in results.items():
        parts = [mixing_cpu.reward_time(t), t.get("update", 0.0), t.get("draw", 0.0)]
        lines.append(
            f"| {variant} | {t['training_step'] * 1e3:.1f} | "
            + " | ".join(f"{x * 1e3:.2f}" for x in parts)
            + f" | {sum(parts) / t['training_step']:.2%} |"
        )
    base = results["uniform"]["training_step"]
    lines += [
        "",
        "training_step vs uniform: "
        + ", ".join(f"{v} {results[v]['training_step'] / base:.3f}x" for v in VARIANTS[1:]),
    ]
    lines += [
        "",
        "With transformers' default loss both rewards are computed inside the loss, from the "
        "loss's own token losses (train_loss) or log-probabilities (entropy): the reward column "
        "holds only the per-example sums and the credit to each dataset. What the entropy "
        "reward adds inside the loss (log-softmax, exp and sum over the vocabulary instead of "
        "the fused cross-entropy) shows in training_step against uniform; the odm variants "
        "also draw other batches (other padded lengths) than uniform, so that ratio carries "
        "some batch-to-batch variation.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

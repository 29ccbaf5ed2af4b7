"""Online data mixing vs static mixing on a tiny Llama: held-out loss per dataset, overhead.

Four synthetic datasets of different difficulty and size (letters of the demo tokenizer):

- ``copy`` (600 rows): one letter repeated 12 times (easy once the first letter is seen);
- ``cycle`` (300): 12 letters of the alphabet from a random start (learn the successor);
- ``pairs`` (150): 6 pairs (x, partner(x)) of a fixed random pairing (half predictable);
- ``noise`` (1200): 12 uniformly random letters (irreducible: ln 16 = 2.77 nats per token).

Variants, all with the same steps, batch size, learning rate and seed: static ``uniform``
weights, static ``proportional`` (concatenation, weights = sizes), ``odm_train_loss`` and
``odm_entropy``, ``odm_validation_loss`` (EXP3 with the plugin's defaults, gamma 0.1, eta 0.1;
the validation
reward holds out 10% of each dataset and updates at every eval). After training, the loss
of each dataset is measured on 64 held-out rows per dataset generated with another seed;
``overall`` is the mean over the four datasets. Step time is the median interval between
consecutive logged steps (``training_logs.jsonl``), so evaluations (validation_loss) show
up in ``train time / step`` but not in the median.

    python benchmarks/odm/mixing_cpu.py --steps 80 --seeds 0 1 2 --out /tmp/odm-bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
from pathlib import Path

LETTERS = "abcdefghijklmnop"
SIZES = {"copy": 600, "cycle": 300, "pairs": 150, "noise": 1200}
VARIANTS = ("uniform", "proportional", "odm_train_loss", "odm_entropy", "odm_validation_loss")


def make_rows(name: str, count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"{name}-{seed}")
    partner = list(LETTERS)
    random.Random("pairing").shuffle(partner)
    rows = []
    for _ in range(count):
        if name == "copy":
            words = [rng.choice(LETTERS)] * 12
        elif name == "cycle":
            start = rng.randrange(16)
            words = [LETTERS[(start + j) % 16] for j in range(12)]
        elif name == "pairs":
            words = []
            for _ in range(6):
                x = rng.randrange(16)
                words += [LETTERS[x], partner[x]]
        else:
            words = [rng.choice(LETTERS) for _ in range(12)]
        rows.append({"text": " ".join(words)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(root: Path, variant: str, files: dict[str, Path], seed: int) -> Path:
    import yaml

    kind = "odm" if variant.startswith("odm") else "default"
    processor: dict = {"type": kind, "seed": seed}
    if variant.startswith("odm"):
        processor["odm"] = {"reward_type": variant.removeprefix("odm_")}
    datasets = []
    for name, path in files.items():
        entry: dict = {"name": name, "data_paths": [str(path)]}
        if variant == "uniform":
            entry["sampling"] = 0.25
        if variant == "odm_validation_loss":
            entry["split"] = {"train": 0.9, "validation": 0.1}
        datasets.append(entry)
    out = root / f"{variant}-{seed}.yaml"
    out.write_text(yaml.safe_dump({"dataprocessor": processor, "datasets": datasets}))
    return out


def held_out_loss(model_dir: Path, tests: dict[str, Path]) -> dict[str, float]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from accel.trainer.arguments import DataArguments
    from accel.trainer.data import tokenize_dataset
    from accel_odm.rewards import per_example_loss

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    collate = DataCollatorForSeq2Seq(tok, padding=True)
    out = {}
    for name, path in tests.items():
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
        ds = tokenize_dataset(rows, tok, DataArguments(dataset_text_field="text"), name)
        total, tokens = 0.0, 0.0
        for start in range(0, len(ds), 32):
            batch = collate([ds[i] for i in range(start, min(start + 32, len(ds)))])
            with torch.no_grad():
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            sums, count = per_example_loss(logits, batch["labels"])
            total += float(sums.sum())
            tokens += float(count.sum())
        out[name] = total / tokens
    out["overall"] = statistics.fmean(out[n] for n in tests)
    return out


def step_times(out_dir: Path) -> float:
    rows = [json.loads(x) for x in (out_dir / "training_logs.jsonl").read_text().splitlines()]
    stamps = [r["timestamp"] for r in rows if "loss" in r]
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


TIMERS: dict[str, float] = {}


def timed(owner: type, name: str) -> None:
    """Wrap ``owner.name`` to add its CPU time (this thread: the machine is shared, so wall
    time would count other jobs) to ``TIMERS[name]`` (benchmark only)."""
    import time

    inner = getattr(owner, name)

    def wrapper(*a, **k):
        start = time.thread_time()
        try:
            return inner(*a, **k)
        finally:
            TIMERS[name] = TIMERS.get(name, 0.0) + time.thread_time() - start

    setattr(owner, name, wrapper)


def install_timers() -> None:
    from accel_odm import rewards
    from accel_odm.plugin import OdmPlugin
    from accel_odm.sampler import OdmBatchSampler

    timed(OdmPlugin, "record")  # a reward in a second pass over the logits (entropy)
    timed(OdmPlugin, "credit")  # adding each example's reward to its dataset
    timed(rewards, "_per_example")  # per-example sums (train_loss: all the reward costs)
    timed(OdmPlugin, "update")  # the EXP3 update and the odm.jsonl line
    timed(OdmBatchSampler, "draw")  # drawing each example's dataset
    from accel.trainer.trainer import AccelTrainer

    timed(AccelTrainer, "training_step")  # forward + backward of a step (all variants)


def reward_time(t: dict[str, float]) -> float:
    """CPU time of the reward: the second pass when there is one (it holds the sums and the
    credit), else the per-example sums and the credit of the one-pass loss."""
    return t.get("record") or t.get("_per_example", 0.0) + t.get("credit", 0.0)


def run_one(root: Path, variant: str, seed: int, files: dict, tests: dict, args) -> dict:
    import accel

    TIMERS.clear()

    out = root / f"run-{variant}-{seed}"
    train = {
        "model_name_or_path": str(root / "model"),
        "data_config": str(data_config(root, variant, files, seed)),
        "dataset_text_field": "text",
        "output_dir": str(out),
        "save_model_dir": str(out / "final"),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": seed,
        "resume_from_checkpoint": "false",
    }
    if variant.startswith("odm"):
        train["odm"] = ["train_loss"]
    if variant == "odm_validation_loss":
        train.update(
            eval_strategy="steps", eval_steps=args.eval_steps, per_device_eval_batch_size=64
        )
    result = accel.train(train)
    timers = dict(TIMERS)  # before the held-out evaluation, which uses the same reductions
    losses = held_out_loss(out / "final", tests)
    return {
        "variant": variant,
        "seed": seed,
        "held_out": losses,
        "examples": result.summary.get("examples_per_dataset"),
        "median_step_s": step_times(out),
        "train_s_per_step": result.summary["runtime_s"] / result.summary["train_steps"],
        "odm_s_per_step": {k: v / args.steps for k, v in timers.items()},
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: list[dict], args, load: str) -> str:
    import numpy
    import torch
    import transformers

    names = [*SIZES, "overall"]
    lines = [
        "# Online data mixing vs static mixing (tiny Llama, CPU)",
        "",
        f"- command: `python benchmarks/odm/mixing_cpu.py --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))} --batch-size {args.batch_size} --lr {args.lr} "
        f"--eval-steps {args.eval_steps}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"({load}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numpy {numpy.__version__}",
        "- model: accel.testing tiny Llama (2 layers, hidden 32), fp32, AdamW, linear decay",
        f"- data: {', '.join(f'{n} {s} rows' for n, s in SIZES.items())} (see the script); "
        "held-out: 64 new rows per dataset",
        f"- every variant: {args.steps} steps of {args.batch_size} examples, same seeds",
        "",
        "Held-out loss per dataset (nats per token, mean ± std over seeds; lower is better):",
        "",
        "| variant | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        cells = [mean_std([r["held_out"][n] for r in runs]) for n in names]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Examples trained per dataset (mean over seeds) and time per step:",
        "",
        "| variant | " + " | ".join(SIZES) + " | median step (ms) | train time / step (ms) | "
        "vs uniform |",
        "|---|" + "---:|" * (len(SIZES) + 3),
    ]
    base = statistics.fmean(r["median_step_s"] for r in results if r["variant"] == "uniform")
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        counts = [statistics.fmean(r["examples"][n] for r in runs) for n in SIZES]
        med = statistics.fmean(r["median_step_s"] for r in runs)
        per = statistics.fmean(r["train_s_per_step"] for r in runs)
        lines.append(
            f"| {variant} | "
            + " | ".join(f"{c:.0f}" for c in counts)
            + f" | {med * 1e3:.1f} | {per * 1e3:.1f} | {med / base:.3f}x |"
        )
    lines += [
        "",
        "CPU time (this thread) per step in odm's own code, and its share of the CPU time of "
        "`training_step` (forward + backward) of the same runs:",
        "",
        "| variant | training_step (ms) | reward (ms) | EXP3 update + log (ms) "
        "| draws (ms) | odm share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        parts = [
            statistics.fmean(reward_time(r["odm_s_per_step"]) for r in runs),
            *(
                statistics.fmean(r["odm_s_per_step"].get(k, 0.0) for r in runs)
                for k in ("update", "draw")
            ),
        ]
        step = statistics.fmean(r["odm_s_per_step"]["training_step"] for r in runs)
        lines.append(
            f"| {variant} | {step * 1e3:.2f} | "
            + " | ".join(f"{x * 1e3:.2f}" for x in parts)
            + f" | {sum(parts) / step:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/odm-bench")
    parser.add_argument("--report", default=str(Path(__file__).with_name("mixing_cpu.md")))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accel.testing import save_tiny_model

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    save_tiny_model(root / "model")
    install_timers()
    files = {n: write_jsonl(root / f"{n}.jsonl", make_rows(n, s, 0)) for n, s in SIZES.items()}
    tests = {n: write_jsonl(root / f"{n}-test.jsonl", make_rows(n, 64, 99)) for n in SIZES}
    load_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = []
    for seed in args.seeds:
        for variant in VARIANTS:  # interleaved, so load changes hit every variant alike
            results.append(run_one(root, variant, seed, files, tests, args))
    load_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load = f"uptime at start: {load_start.split('load')[-1].strip()}; at end: " + (
        load_end.split("load")[-1].strip()
    )
    (root / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, args, load)
    trace = root / f"run-odm_train_loss-{args.seeds[0]}" / "odm.jsonl"
    if trace.is_file():
        rows = [json.loads(x) for x in trace.read_text().splitlines()]
        text += (
            f"\nProbabilities of odm_train_loss (seed {args.seeds[0]}) every "
            f"{max(1, len(rows) // 8)} updates (`odm.jsonl`):\n\n| step | "
            + " | ".join(rows[0]["datasets"])
            + " |\n|---:|"
            + "---:|" * len(SIZES)
            + "\n"
        )
        for row in rows[:: max(1, len(rows) // 8)] + [rows[-1]]:
            text += (
                f"| {row['step']} | "
                + " | ".join(f"{p:.3f}" for p in row["probabilities"])
                + " |\n"
            )
    Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

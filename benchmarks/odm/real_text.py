"""Online data mixing vs static mixing on the real-text corpus (``accel bench corpus``).

Protocol: ``real_text_protocol.md`` beside this file (fixed before the first run). Every
variant trains the same small Llama from the same initialisation for the same steps on the
corpus's train split, mixed by:

- ``uniform``: static, every domain weight 1/K; ``proportional``: static, by domain size;
- ``odm_<reward>``: the odm plugin (EXP3, its defaults) with each reward of
  ``accel_odm.records`` (validation rewards read a 3% validation split of each train file
  at every evaluation).

Every ``--eval-every`` steps a checkpoint is saved; afterwards each is scored on a fixed
subset of every domain's held-out split (documents no run trained on): loss per domain and
the mean over the real domains (noise excluded). Steps-to-target: the first evaluation at
which a variant's seed-mean real-domain loss reaches uniform's final seed-mean.

    python benchmarks/odm/real_text.py --out /tmp/odm-real --jobs 2 --threads 1
    python benchmarks/odm/real_text.py --out /tmp/odm-real --report-only   # tables again
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = ("uniform", "proportional")
REWARDS = (
    "train_loss",
    "entropy",
    "validation_loss",
    "train_loss_decrease",
    "validation_loss_decrease",
)
VARIANTS = (*STATIC, *(f"odm_{r}" for r in REWARDS))
VALIDATION_FRACTION = 0.03
#: the model (Llama): ~1.6M parameters, most of them in the 4096-token embeddings
MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def build_model(corpus: Path, target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **MODEL,
    )
    torch.manual_seed(1234)  # one initialisation for every variant and seed
    LlamaForCausalLM(config).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def data_config(root: Path, corpus: Path, variant: str, seed: int) -> Path:
    import yaml

    domains = json.loads((corpus / "corpus.json").read_text())["domains"]
    odm = variant.startswith("odm_")
    processor: dict = {"type": "odm" if odm else "default", "seed": seed}
    if odm:
        processor["odm"] = {"reward_type": variant.removeprefix("odm_")}
    datasets = []
    for name in domains:
        entry: dict = {"name": name, "data_paths": [str(corpus / name / "train.jsonl")]}
        if variant == "uniform":
            entry["sampling"] = 1 / len(domains)
        if variant.startswith("odm_validation"):
            entry["split"] = {"train": 1 - VALIDATION_FRACTION, "validation": VALIDATION_FRACTION}
        datasets.append(entry)
    out = root / "configs" / f"{variant}-{seed}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"dataprocessor": processor, "datasets": datasets}))
    return out


def eval_sets(corpus: Path, per_domain: int, max_len: int) -> dict[str, list[list[int]]]:
    """``per_domain`` held-out examples of every domain, evenly spaced over the split (so
    they come from many documents), tokenized as training tokenizes (eos appended)."""
    from transformers import AutoTokenizer

    from accel_bench.corpus import load_split

    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    out = {}
    for name in json.loads((corpus / "corpus.json").read_text())["domains"]:
        rows = load_split(corpus, name, "held_out")
        step = max(1, len(rows) // per_domain)
        picked = rows[::step][:per_domain]
        out[name] = [(tok(t)["input_ids"] + [tok.eos_token_id])[:max_len] for t in picked]
    return out


def score(model_dir: Path, sets: dict[str, list[list[int]]]) -> dict[str, float]:
    """Token-weighted mean loss per domain on the held-out examples."""
    import torch
    from transformers import AutoModelForCausalLM

    from accel_odm.rewards import per_example_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = {}
    for name, seqs in sets.items():
        total = tokens = 0.0
        for start in range(0, len(seqs), 16):
            part = seqs[start : start + 16]
            width = max(len(s) for s in part)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in part])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part])
            labels = ids.masked_fill(mask == 0, -100)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            sums, count = per_example_loss(logits, labels)
            total += float(sums.sum())
            tokens += float(count.sum())
        out[name] = total / tokens
    return out


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict:
    """Train one variant with one seed, score its checkpoints; returns the result row."""
    sys.path.insert(0, str(HERE))
    from mixing_cpu import TIMERS, install_timers, reward_time

    import accel

    install_timers()
    root, corpus = Path(args.out), Path(args.corpus)
    out = root / f"run-{variant}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    train = {
        "model_name_or_path": str(root / "model"),
        "data_config": str(data_config(root, corpus, variant, seed)),
        "dataset_text_field": "text",
        "max_seq_length": args.max_len,
        "output_dir": str(out),
        "save_model_dir": str(out / "final"),
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": args.warmup,
        "weight_decay": 0.0,
        "logging_steps": 5,
        "save_strategy": "steps",
        "save_steps": args.eval_every,
        "save_only_model": True,
        "disable_tqdm": True,
        "seed": seed,
        "resume_from_checkpoint": "false",
        "dataloader_num_workers": 0,
    }
    if variant.startswith("odm_"):
        train["odm"] = [variant.removeprefix("odm_")]
    if variant.startswith("odm_validation"):
        train.update(
            eval_strategy="steps", eval_steps=args.eval_every, per_device_eval_batch_size=32
        )
    started = time.monotonic()
    result = accel.train(train)
    train_wall = time.monotonic() - started
    timers = dict(TIMERS)
    sets = eval_sets(corpus, args.eval_examples, args.max_len)
    curve = []
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        losses = score(out / f"checkpoint-{step}", sets)
        curve.append({"step": step, **losses})
        shutil.rmtree(out / f"checkpoint-{step}")
    odm_parts = [
        reward_time(timers),
        timers.get("update", 0.0),
        timers.get("draw", 0.0),
    ]
    return {
        "variant": variant,
        "seed": seed,
        "curve": curve,
        "examples": result.summary.get("examples_per_dataset"),
        "train_wall_s": train_wall,
        "training_step_cpu_s": timers.get("training_step", 0.0) / args.steps,
        "odm_cpu_s": sum(odm_parts) / args.steps,
    }


# -- the report ------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def ms(values: list[float]) -> str:
    return f"{mean(values):.3f} ± {std(values):.3f}"


def real_mean(point: dict, real: list[str]) -> float:
    return mean([point[d] for d in real])


def steps_to_target(runs: list[dict], target: float, real: list[str]) -> int | None:
    """The first evaluation step at which the seed-mean real-domain loss is <= target."""
    steps = [p["step"] for p in runs[0]["curve"]]
    for i, step in enumerate(steps):
        if mean([real_mean(r["curve"][i], real) for r in runs]) <= target:
            return step
    return None


def report(results: list[dict], manifest: dict, args: argparse.Namespace, load: str) -> str:
    import torch
    import transformers

    domains, real = manifest["domains"], manifest["real_domains"]
    by = {v: [r for r in results if r["variant"] == v] for v in VARIANTS}
    by = {v: rs for v, rs in by.items() if rs}
    final = {v: [real_mean(r["curve"][-1], real) for r in rs] for v, rs in by.items()}
    target = mean(final["uniform"])
    uniform_steps = steps_to_target(by["uniform"], target, real)
    lines = [
        "# Online data mixing vs static mixing on the real-text corpus",
        "",
        f"- command: `{' '.join(args.command)}`",
        f"- date: {datetime.date.today().isoformat()}; protocol: `real_text_protocol.md`",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"({load}); Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- corpus: `accel bench corpus`, sha256 `{manifest['sha256']}`",
        f"- model: Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"vocabulary {manifest['vocab_size']}; {args.steps} steps of {args.batch_size} examples "
        f"(<= {args.max_len} tokens), AdamW lr {args.lr}, constant after {args.warmup} warm-up "
        f"steps; seeds {' '.join(map(str, args.seeds))}",
        f"- held-out: {args.eval_examples} examples per domain from the held-out documents, "
        f"scored every {args.eval_every} steps; `real` = mean over {', '.join(real)}",
        "",
        "Final held-out loss (nats per token, mean ± std over seeds; lower is better):",
        "",
        "| variant | " + " | ".join(domains) + " | real |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    for v, rs in by.items():
        cells = [ms([r["curve"][-1][d] for r in rs]) for d in domains]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {ms(final[v])} |")
    lines += [
        "",
        f"Steps-to-target (target: uniform's final real-domain loss {target:.3f}; first "
        "evaluation where the seed-mean reaches it), and the real-domain loss at every "
        "evaluation (seed mean; difference to uniform in units of the variant's seed std at "
        "that step):",
        "",
    ]
    steps = [p["step"] for p in by["uniform"][0]["curve"]]
    lines += ["| variant | steps-to-target | % of uniform | " + " | ".join(map(str, steps)) + " |"]
    lines += ["|---|---:|---:|" + "---:|" * len(steps)]
    best = None
    for v, rs in by.items():
        reach = steps_to_target(rs, target, real)
        pct = 100 * reach / uniform_steps if reach and uniform_steps else None
        cells = []
        for i in range(len(steps)):
            here = [real_mean(r["curve"][i], real) for r in rs]
            base = mean([real_mean(r["curve"][i], real) for r in by["uniform"]])
            delta = mean(here) - base
            spread = std(here)
            tag = "" if v == "uniform" else f" ({delta / spread:+.1f}σ)" if spread else ""
            cells.append(f"{mean(here):.3f}{tag}")
        lines.append(
            f"| {v} | {reach if reach else 'not reached'} | "
            f"{f'{pct:.0f}%' if pct else '-'} | " + " | ".join(cells) + " |"
        )
        if v.startswith("odm_") and pct is not None and (best is None or pct < best[1]):
            best = (v.removeprefix("odm_"), pct)
        if v.startswith("odm_") and pct is None and best is None:
            best = None
    lines += [
        "",
        "Examples trained per domain (mean over seeds), wall time, and odm's own CPU time per "
        "step (this process's thread: reward, EXP3 update + log, draws) against "
        "`training_step`'s (forward + backward):",
        "",
        "| variant | " + " | ".join(domains) + " | noise share | train wall (s) | "
        "training_step (ms) | odm (ms) | odm share |",
        "|---|" + "---:|" * (len(domains) + 5),
    ]
    for v, rs in by.items():
        counts = [mean([r["examples"][d] for r in rs]) for d in domains]
        step_ms = mean([r["training_step_cpu_s"] for r in rs]) * 1e3
        odm_ms = mean([r["odm_cpu_s"] for r in rs]) * 1e3
        lines.append(
            f"| {v} | "
            + " | ".join(f"{c:.0f}" for c in counts)
            + f" | {counts[domains.index('noise')] / sum(counts):.1%}"
            + f" | {mean([r['train_wall_s'] for r in rs]):.0f} | {step_ms:.1f} | {odm_ms:.2f} "
            f"| {odm_ms / step_ms:.2%} |"
        )
    lines += ["", "Weights per variant (seed 0): `real_text_plots/<variant>.png`.", ""]
    if best is None:
        lines.append(
            "steps-to-target: none of the online rewards reached uniform's final held-out loss"
        )
    else:
        lines.append(f"steps-to-target: {best[0]} {best[1]:.0f}% of uniform")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], root: Path, manifest: dict, target: Path) -> None:
    """The weights plot of every variant, seed 0: odm's from its ``odm.jsonl`` (what
    ``accel plot odm`` draws), the static ones from their fixed weights."""
    from accel_odm.plot import plot_run, render

    target.mkdir(parents=True, exist_ok=True)
    domains = manifest["domains"]
    seed = min(r["seed"] for r in results)
    for v in VARIANTS:
        rows = [r for r in results if r["variant"] == v and r["seed"] == seed]
        if not rows:
            continue
        if v.startswith("odm_"):
            plot_run(root / f"run-{v}-{seed}", target / f"{v}.png")
            continue
        if v == "uniform":
            weights = [1 / len(domains)] * len(domains)
        else:
            sizes = [manifest["sizes"][d]["train"]["examples"] for d in domains]
            weights = [s / sum(sizes) for s in sizes]
        records = [
            {"step": s, "datasets": domains, "weights": weights, "probabilities": weights}
            for s in (0, rows[0]["curve"][-1]["step"])
        ]
        render(records, target / f"{v}.png", title=f"static mixing: {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/odm-real")
    parser.add_argument("--corpus", default=None, help="a built corpus (default: build one)")
    parser.add_argument("--chunk-chars", type=int, default=450, help="corpus example size")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--report", default=str(HERE / "real_text.md"))
    args = parser.parse_args()
    args.command = ["python", "benchmarks/odm/real_text.py", *sys.argv[1:]]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    args.corpus = args.corpus or str(root / "corpus")
    if args.one:
        row = run_one(args, args.one[0], int(args.one[1]))
        path = root / "results" / f"{args.one[0]}-{args.one[1]}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(row))
        return
    if not args.report_only:
        corpus = Path(args.corpus)
        if not (corpus / "corpus.json").is_file():
            from accel_bench.corpus import build

            built = build(corpus, chunk_chars=args.chunk_chars, log=print)
            print(f"corpus sha256 {built.sha256} ({built.manifest['build_seconds']} s)")
        build_model(corpus, root / "model")
        load_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout
        todo = [(v, s) for s in args.seeds for v in args.variants]  # seeds outer: interleaved
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        running: list[subprocess.Popen] = []
        for v, s in todo:
            while len(running) >= args.jobs:
                running = [p for p in running if p.poll() is None]
                time.sleep(1)
            cmd = [sys.executable, __file__, "--one", v, str(s), *_passed(args)]
            log = open(root / f"log-{v}-{s}.txt", "w")  # noqa: SIM115 (closed by the child)
            running.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"started {v} seed {s}", flush=True)
        for p in running:
            p.wait()
        load_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout
        (root / "load.txt").write_text(
            f"uptime at start: {load_start.split('load')[-1].strip()}; at end: "
            f"{load_end.split('load')[-1].strip()}"
        )
    results = [json.loads(p.read_text()) for p in sorted((root / "results").glob("*.json"))]
    manifest = json.loads((Path(args.corpus) / "corpus.json").read_text())
    load = (root / "load.txt").read_text() if (root / "load.txt").is_file() else "load unknown"
    if (root / "probe.txt").is_file():  # the jobs/threads probe of the protocol, if recorded
        load += "; " + (root / "probe.txt").read_text().strip()
    text = report(results, manifest, args, load)
    plots(results, root, manifest, Path(args.report).parent / "real_text_plots")
    Path(args.report).write_text(text)
    print(text)


def _passed(args: argparse.Namespace) -> list[str]:
    return [
        "--out", args.out, "--corpus", args.corpus, "--steps", str(args.steps),
        "--eval-every", str(args.eval_every), "--eval-examples", str(args.eval_examples),
        "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
        "--lr", str(args.lr), "--warmup", str(args.warmup),
    ]  # fmt: skip


if __name__ == "__main__":
    main()

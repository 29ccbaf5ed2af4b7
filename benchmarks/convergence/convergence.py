"""Convergence matrix: every acceleration trained on the real-text corpus against plain training.

Protocol and the reason for every tolerance: ``README.md`` beside this file. Each run trains
a small model from one initialisation on the same examples of the corpus (``accel corpus``)
in its own process (two under ``torch.distributed.run`` for the distributed rows); each row
compares one run with its baseline: the per-step training loss of every step and the final
held-out loss (token mean over held-out examples of every real domain, scored on the saved
or merged model).

    python benchmarks/convergence/convergence.py --out /tmp/convergence       # full matrix
    python benchmarks/convergence/convergence.py --out /tmp/cc --quick        # the CI cut
    python benchmarks/convergence/convergence.py --out /tmp/cc --rows fast_kernels ddp2

Exit status 1 when a row is outside its tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "odm"))
import real_text  # noqa: E402  (the corpus model and held-out scoring of the odm benchmark)

LORA = {
    "peft_method": "lora",
    "target_modules": ["all-linear"],
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
}
KERNELS = {"fast_kernels": [True, True, True, True]}
#: the MoE model: Mixtral with the Llama's attention dimensions, 4 experts, top-2
MOE = {
    **real_text.MODEL,
    "intermediate_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "output_router_logits": True,
}


@dataclass(frozen=True)
class Run:
    """One training run: ``args`` on top of the common ones, ``nproc`` processes (the global
    batch stays the same), from ``base`` (``init``: the random Llama; ``trained``: the
    ``full`` run's model; ``gptq``: that model quantized; ``moe``: the random Mixtral), on
    ``data`` (``mix``: the interleaved domains; ``odm``: the domains as a data config;
    ``replay``: the examples the odm run draws, in its order)."""

    args: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1
    base: str = "init"
    data: str = "mix"


RUNS: dict[str, Run] = {
    "full": Run(),
    "full_repeat": Run(),
    "full_seed1": Run({"data_seed": 1}),
    "fast_kernels": Run(KERNELS),
    "padding_free": Run({"padding_free": ["huggingface"]}),
    "fast_kernels+padding_free": Run({**KERNELS, "padding_free": ["huggingface"]}),
    "ddp2": Run(nproc=2),
    "fsdp2": Run({"fsdp_size": 2}, nproc=2),
    "multipack2": Run({"padding_free": ["huggingface"], "multipack": [2]}, nproc=2),
    "lora": Run(LORA, base="trained"),
    "lora_fused": Run({**LORA, "fused_lora": ["plain", True]}, base="trained"),
    "lora_fused+fast_kernels": Run(
        {**LORA, **KERNELS, "fused_lora": ["plain", True]}, base="trained"
    ),
    "qlora_nf4": Run({**LORA, "bnb_qlora": ["nf4"]}, base="trained"),
    "qlora_nf4_fused": Run(
        {**LORA, "bnb_qlora": ["nf4"], "fused_lora": ["bitsandbytes", True]}, base="trained"
    ),
    "gptq_lora": Run({**LORA, "auto_gptq": ["triton_v2"], "torch_dtype": "bfloat16"}, base="gptq"),
    "gptq_lora_fused": Run(
        {
            **LORA,
            "auto_gptq": ["triton_v2"],
            "torch_dtype": "bfloat16",
            "fused_lora": ["auto_gptq", True],
        },
        base="gptq",
    ),
    "moe": Run(base="moe"),
    "moe_scattermoe": Run({"fast_moe": [True]}, base="moe"),
    "moe_scattermoe_ep2": Run({"fast_moe": [2]}, nproc=2, base="moe"),
    "odm_uniform": Run({"odm": ["train_loss"]}, data="odm"),
    "static_replay": Run({"train_sampling_strategy": "sequential"}, data="replay"),
}


@dataclass(frozen=True)
class Row:
    """``run`` against ``baseline``. ``check``: ``exact`` (every step loss and the held-out
    loss equal bit for bit), ``close`` (relative per-step and held-out differences within
    ``step_rtol`` / ``held_rtol``), ``band`` (batches differ, so only the held-out loss is
    judged: within ``band`` nats). ``min_drop``: the run's loss must fall by at least this
    much (mean of the last 5 steps against the first 5), so no row passes by not training."""

    run: str
    baseline: str
    check: str
    why: str
    #: ``close``: the fp32 reorder tolerance unless the row states its own
    step_rtol: float = 2e-4
    held_rtol: float = 2e-4
    band: float = 0.0
    min_drop: float = 0.5


FP32_REORDER = (
    "fp32, the same math with sums in another order; AdamW amplifies the last-bit differences "
    "step by step"
)
_ROWS = (
    Row(
        "full_repeat", "full", "exact",
        "the same run twice: training is deterministic here, so every difference in the other "
        "rows comes from the acceleration",
    ),
    Row(
        "fast_kernels", "full", "close", FP32_REORDER + " (fused loss, RMSNorm, RoPE, SwiGLU)",
    ),
    Row(
        "padding_free", "full", "close",
        "one packed row instead of padded rows: the same tokens and attention, another sum order",
    ),
    Row(
        "fast_kernels+padding_free", "full", "close", FP32_REORDER,
    ),
    Row(
        "ddp2", "full", "close",
        "2 processes x 4 = 1 process x 8: the same examples per step, gradients summed over ranks",
    ),
    Row(
        "fsdp2", "full", "close",
        "FSDP2 shards (2 processes x 4): same examples, reduce-scattered gradients",
    ),
    Row(
        "multipack2", "ddp2", "band",
        "multipack regroups the examples into other batches, so the step losses are of other "
        "batches; the held-out loss must land within the spread of a changed batch order",
        band=0.05,
    ),
    Row(
        "lora_fused", "lora", "close", FP32_REORDER + " (base matmul + LoRA update in one function)",
        min_drop=0.02,
    ),
    Row(
        "lora_fused+fast_kernels", "lora", "close", FP32_REORDER,
        min_drop=0.02,
    ),
    Row(
        "qlora_nf4_fused", "qlora_nf4", "close",
        "the same nf4 base (another model than the fp32 one, so its own QLoRA baseline); fp32 "
        "compute on the dequantized weights, another sum order",
        min_drop=0.02,
    ),
    Row(
        "gptq_lora_fused", "gptq_lora", "close",
        "the same GPTQ base, its own GPTQ-LoRA baseline; bf16 training: each matmul rounds to "
        "8 mantissa bits (4e-3), differently in the fused order",
        step_rtol=2e-2, held_rtol=1e-2, min_drop=0.02,
    ),
    Row(
        "moe_scattermoe", "moe", "close",
        FP32_REORDER + " (grouped expert GEMMs after one routing sort vs the eager loop)",
    ),
    Row(
        "moe_scattermoe_ep2", "moe_scattermoe", "close",
        "expert parallelism over 2 processes (all-to-all token exchange), same global batch",
    ),
    Row(
        "odm_uniform", "static_replay", "close",
        "odm with gamma 1 draws every dataset with probability 1/K whatever its reward; the "
        "static run trains those same draws in the same order. Not bit-identical: the "
        "train_loss reward takes the loss from per-token losses summed in the same pass "
        "(cross_entropy reduction 'none', then sum) instead of the 'sum' reduction",
    ),
)  # fmt: skip
ROWS: dict[str, Row] = {row.run: row for row in _ROWS}
#: the CI cut: single-process rows, cheap enough for the test suite
QUICK_ROWS = (
    "full_repeat",
    "fast_kernels",
    "padding_free",
    "lora_fused",
    "qlora_nf4_fused",
    "odm_uniform",
)
#: a second data order of the baseline: the spread the multipack band is read against
EXTRA_RUNS = {"multipack2": ("full_seed1",)}


@dataclass
class Settings:
    corpus: str
    steps: int = 100
    batch_size: int = 8
    max_len: int = 128
    lr: float = 2e-3
    lora_lr: float = 1e-3
    warmup: int = 5
    per_domain: int = 200  # training examples per real domain
    eval_examples: int = 24  # held-out examples per real domain


def quick_settings(corpus: str | Path) -> Settings:
    """The CI cut's sizes (``--quick`` and tests/test_convergence.py)."""
    return Settings(corpus=str(corpus), steps=20, per_domain=64, eval_examples=12)


# -- data and models ----------------------------------------------------------------------


def write_data(root: Path, settings: Settings) -> dict[str, Path]:
    """``mix.jsonl``: ``per_domain`` training examples of every real domain (evenly spaced
    over the split), interleaved; ``<domain>.jsonl`` the same examples per domain and an odm
    data config over them (gamma 1, seeded)."""
    import yaml

    from accel_bench.corpus import load_split

    corpus = Path(settings.corpus)
    real = json.loads((corpus / "corpus.json").read_text())["real_domains"]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    picked = {}
    for name in real:
        rows = load_split(corpus, name, "train")
        step = max(1, len(rows) // settings.per_domain)
        picked[name] = rows[::step][: settings.per_domain]
        lines = "".join(json.dumps({"text": t}) + "\n" for t in picked[name])
        (data / f"{name}.jsonl").write_text(lines)
    mixed = [picked[d][i] for i in range(settings.per_domain) for d in real if i < len(picked[d])]
    (data / "mix.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in mixed))
    config = {
        "dataprocessor": {"type": "odm", "seed": 7, "odm": {"gamma": 1.0}},
        "datasets": [{"name": d, "data_paths": [str(data / f"{d}.jsonl")]} for d in real],
    }
    (data / "odm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_replay(data, config, picked, settings)
    return {"mix": data / "mix.jsonl", "odm": data / "odm.yaml", "replay": data / "replay.jsonl"}


def write_replay(data: Path, config: dict, picked: dict[str, list[str]], s: Settings) -> None:
    """The examples odm's sampler draws for ``steps`` batches with gamma 1 (uniform whatever
    the rewards), in order: what the static run trains with a sequential sampler."""
    from accel_odm.bandit import Exp3
    from accel_odm.sampler import OdmBatchSampler

    names = [d["name"] for d in config["datasets"]]
    rows = [t for n in names for t in picked[n]]
    bandit = Exp3(len(names), gamma=1.0, eta=0.1)
    sampler = OdmBatchSampler(
        [len(picked[n]) for n in names],
        bandit,
        batch_size=s.batch_size,
        seed=config["dataprocessor"]["seed"],
        track=False,
    )
    if len(sampler) < s.steps:
        raise ValueError(f"{s.steps} steps exceed one odm epoch ({len(sampler)} batches)")
    order = [i for batch, _ in zip(sampler, range(s.steps), strict=False) for i in batch]
    (data / "replay.jsonl").write_text("".join(json.dumps({"text": rows[i]}) + "\n" for i in order))


def build_moe(corpus: Path, target: Path) -> Path:
    """The random Mixtral every MoE run starts from (its own seed, saved with the tokenizer)."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    ids = {k: getattr(tok, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    torch.manual_seed(4321)
    MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), **ids, **MOE)).save_pretrained(target)
    tok.save_pretrained(target)
    return target


def quantize_trained(root: Path) -> Path:
    """The ``full`` run's model as a 4-bit GPTQ checkpoint (``accel quantize``'s code)."""
    from accel_peft.quantize import quantize

    target = root / "gptq"
    if not (target / "config.json").is_file():
        quantize(
            str(root / "run-full" / "final"),
            str(target),
            bits=4,
            group_size=128,
            calibration=str(root / "data" / "mix.jsonl"),
            max_examples=32,
        )
    return target


# -- one run ------------------------------------------------------------------------------


def train_args(root: Path, name: str, settings: Settings) -> dict[str, Any]:
    run = RUNS[name]
    model = {"init": root / "model", "trained": root / "run-full" / "final"}.get(
        run.base, root / run.base
    )
    data = {"mix": root / "data" / "mix.jsonl", "replay": root / "data" / "replay.jsonl"}
    out = root / f"run-{name}"
    args: dict[str, Any] = {
        "model_name_or_path": str(model),
        "dataset_text_field": "text",
        "max_seq_length": settings.max_len,
        "output_dir": str(out),
        "save_model_dir": str(out / "final"),
        "per_device_train_batch_size": settings.batch_size // run.nproc,
        "max_steps": settings.steps,
        "learning_rate": settings.lora_lr if run.base in ("trained", "gptq") else settings.lr,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": settings.warmup,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "resume_from_checkpoint": "false",
        "dataloader_num_workers": 0,
    }
    if run.data == "odm":
        args["data_config"] = str(root / "data" / "odm.yaml")
    else:
        args["training_data_path"] = str(data[run.data])
    args.update(run.args)
    return args


def held_out_model(final: Path) -> Path:
    """A folder ``AutoModelForCausalLM`` loads with the trained weights: the saved model, or
    the adapters merged into their base (dequantized for 4-bit bases) beside it."""
    if not (final / "adapter_config.json").is_file():
        return final
    from accel_peft.export import export_merged

    merged = final.with_name("merged")
    shutil.rmtree(merged, ignore_errors=True)
    return export_merged(str(final), str(merged))


def run_one(root: Path, name: str, settings: Settings) -> dict[str, Any] | None:
    """Train ``name``, score its held-out loss; rank 0 returns (and writes) the result."""
    import accel

    out = root / f"run-{name}"
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    result = accel.train(train_args(root, name, settings))
    wall = time.monotonic() - started
    # a patch of a modeling file (RoPE) outlives the run's model: undo it, so that the next run
    # in this process (the CI cut) and the scoring start from transformers' own code
    result.framework.revert_patches()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    logs = [json.loads(line) for line in (out / "training_logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    sets = real_text.eval_sets(Path(settings.corpus), settings.eval_examples, settings.max_len)
    held = real_text.score(held_out_model(out / "final"), sets)
    row = {
        "run": name,
        "losses": losses,
        "held_out": held,
        "held_out_mean": sum(held.values()) / len(held),
        "train_wall_s": round(wall, 1),
        "summary": {k: str(v) for k, v in result.summary.items()},
    }
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / f"{name}.json").write_text(json.dumps(row))
    return row


# -- the matrix ---------------------------------------------------------------------------


def needed_runs(rows: list[str]) -> list[str]:
    """Every run the rows compare, baselines first, and ``full`` before what starts from it."""
    names: list[str] = []
    for r in rows:
        for n in (ROWS[r].baseline, ROWS[r].run, *EXTRA_RUNS.get(r, ())):
            if RUNS[n].base in ("trained", "gptq") and "full" not in names:
                names.append("full")
            if n not in names:
                names.append(n)
    return sorted(names, key=lambda n: RUNS[n].base in ("trained", "gptq"))


def prepare(
    root: Path,
    settings: Settings,
    runs: list[str],
    scale: float = 1.0,
    vocab_size: int = 4096,
    domains: tuple[str, ...] | None = None,
) -> None:
    """The corpus (built unless there; ``domains``: only those), the data files and the
    initial models."""
    corpus = Path(settings.corpus)
    if not (corpus / "corpus.json").is_file():
        from accel_bench.corpus import build, sources

        found = sources()
        picked = {d: found[d] for d in domains} if domains else found
        built = build(
            corpus,
            scale=scale,
            chunk_chars=450,
            vocab_size=vocab_size,
            domain_sources=picked,
            log=print,
        )
        print(f"corpus sha256 {built.sha256} ({built.manifest['build_seconds']} s)")
    write_data(root, settings)
    real_text.build_model(corpus, root / "model")
    if any(RUNS[n].base == "moe" for n in runs):
        build_moe(corpus, root / "moe")
    (root / "settings.json").write_text(json.dumps(vars(settings)))


def launch(root: Path, name: str, port: int) -> None:
    """One run in its own process(es), one thread each; its output in ``log-<name>.txt``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable]
    if RUNS[name].nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(RUNS[name].nproc)]
        cmd += ["--master_port", str(port)]
    cmd += [__file__, "--out", str(root), "--one", name]
    with open(root / f"log-{name}.txt", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (root / f"log-{name}.txt").read_text()[-3000:]
        raise RuntimeError(f"run {name} failed (exit {done.returncode}):\n{tail}")


def execute(root: Path, settings: Settings, runs: list[str], inline: bool) -> dict[str, dict]:
    """Every run, in order (those from the trained model after it). ``inline``: in this
    process, one after another (the CI cut: imports paid once); else each in its own."""
    results: dict[str, dict] = {}
    for i, name in enumerate(runs):
        if RUNS[name].base == "gptq":
            quantize_trained(root)
        started = time.monotonic()
        if inline and RUNS[name].nproc == 1:
            results[name] = run_one(root, name, settings)
        else:
            launch(root, name, 29700 + i)
            results[name] = json.loads((root / "results" / f"{name}.json").read_text())
        print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)
    return results


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def compare(row: Row, results: dict[str, dict]) -> dict[str, Any]:
    """The row's numbers and verdict; ``failures`` says what is out of tolerance."""
    got, base = results[row.run], results[row.baseline]
    a, b = got["losses"], base["losses"]
    out: dict[str, Any] = {
        "steps": len(a),
        "max_abs": max(abs(x - y) for x, y in zip(a, b, strict=False)),
        "max_rel": max(rel(x, y) for x, y in zip(a, b, strict=False)),
        "held": got["held_out_mean"],
        "held_base": base["held_out_mean"],
        "drop": sum(a[:5]) / 5 - sum(a[-5:]) / 5,
        "failures": [],
    }
    fail = out["failures"]
    if len(a) != len(b):
        fail.append(f"{len(a)} steps vs {len(b)}")
    if out["drop"] < row.min_drop:
        fail.append(f"loss fell by {out['drop']:.3f} < {row.min_drop}")
    held_delta = abs(out["held"] - out["held_base"])
    if row.check == "exact":
        if a != b:
            fail.append("step losses differ")
        if got["held_out"] != base["held_out"]:
            fail.append("held-out losses differ")
        out["tolerance"] = "bit-identical"
    elif row.check == "close":
        if out["max_rel"] > row.step_rtol:
            fail.append(f"step rel {out['max_rel']:.2e} > {row.step_rtol:.0e}")
        if rel(out["held"], out["held_base"]) > row.held_rtol:
            fail.append(f"held-out rel {rel(out['held'], out['held_base']):.2e}")
        out["tolerance"] = f"step rel <= {row.step_rtol:.0e}, held-out rel <= {row.held_rtol:.0e}"
    else:
        if held_delta > row.band:
            fail.append(f"held-out |delta| {held_delta:.3f} > {row.band}")
        out["tolerance"] = f"held-out abs <= {row.band} (steps not judged)"
    return out


def table(rows: list[str], results: dict[str, dict]) -> tuple[str, bool]:
    lines = [
        "| row | baseline | steps | max abs Δ step loss | max rel Δ | held-out (row) "
        "| held-out (baseline) | held-out rel Δ | tolerance | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    ok = True
    for name in rows:
        row = ROWS[name]
        c = compare(row, results)
        ok = ok and not c["failures"]
        verdict = "pass" if not c["failures"] else "FAIL: " + "; ".join(c["failures"])
        lines.append(
            f"| {name} | {row.baseline} | {c['steps']} | {c['max_abs']:.2e} | {c['max_rel']:.2e} "
            f"| {c['held']:.6f} | {c['held_base']:.6f} | {rel(c['held'], c['held_base']):.2e} "
            f"| {c['tolerance']} | {verdict} |"
        )
    return "\n".join(lines), ok


def report(rows: list[str], results: dict[str, dict], settings: Settings, command: str) -> str:
    from importlib import metadata

    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    text, _ = table(rows, results)
    manifest = json.loads((Path(settings.corpus) / "corpus.json").read_text())
    dists = ("transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "accel-core")
    lines = [
        "# Convergence matrix on the real-text corpus (CPU)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; protocol and tolerances: `README.md`",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores "
        f"(shared); Python {platform.python_version()}, torch {torch.__version__}, "
        + ", ".join(f"{d} {version(d)}" for d in dists),
        f"- corpus: `accel corpus`, sha256 `{manifest['sha256']}`; "
        f"{settings.per_domain} training examples and {settings.eval_examples} held-out "
        f"examples per real domain ({', '.join(manifest['real_domains'])})",
        f"- models: Llama {real_text.MODEL['num_hidden_layers']} layers, hidden "
        f"{real_text.MODEL['hidden_size']}, vocabulary {manifest['vocab_size']} (fp32); Mixtral "
        f"the same with {MOE['num_local_experts']} experts, top-{MOE['num_experts_per_tok']}; "
        f"{settings.steps} steps, global batch {settings.batch_size}, <= {settings.max_len} "
        f"tokens, AdamW lr {settings.lr} (LoRA {settings.lora_lr}), {settings.warmup} warm-up",
        "",
        "Per-step training loss over every step and the final held-out loss (nats per token, "
        "mean over the real domains); Δ = row - baseline:",
        "",
        text,
        "",
        "Why each tolerance:",
        "",
        *[f"- `{r}`: {ROWS[r].why}" for r in rows],
        "",
    ]
    if any(r in EXTRA_RUNS for r in rows) and "full_seed1" in results:
        d = abs(results["full_seed1"]["held_out_mean"] - results["full"]["held_out_mean"])
        lines += [
            f"Spread of a changed batch order (`full` with data_seed 1 vs 0): held-out |Δ| "
            f"{d:.4f}, the scale the multipack band is set against.",
            "",
        ]
    wall = ", ".join(f"{n} {r['train_wall_s']:.0f}" for n, r in results.items())
    lines += [f"Training wall time per run (s): {wall}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/convergence")
    parser.add_argument("--corpus", default=None, help="a built corpus (default: build one)")
    parser.add_argument("--steps", type=int, default=None, help="default 100 (--quick: 20)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, metavar="ROW")
    parser.add_argument("--quick", action="store_true", help="the CI cut: " + ", ".join(QUICK_ROWS))
    parser.add_argument("--inline", action="store_true", help="single-process runs in-process")
    parser.add_argument("--report", default=None, help="default: results_cpu.md beside this")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.out)
    if args.one:
        settings = Settings(**json.loads((root / "settings.json").read_text()))
        run_one(root, args.one, settings)
        return 0
    rows = args.rows or list(QUICK_ROWS if args.quick else ROWS)
    corpus = args.corpus or str(root / "corpus")
    settings = quick_settings(corpus) if args.quick else Settings(corpus=corpus)
    settings.steps = args.steps or settings.steps
    root.mkdir(parents=True, exist_ok=True)
    runs = needed_runs(rows)
    prepare(root, settings, runs)
    results = execute(root, settings, runs, inline=args.inline or args.quick)
    command = "python benchmarks/convergence/convergence.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = report(rows, results, settings, command)
    print(text)
    if args.report or not args.quick:
        from accel.api import write_atomic

        write_atomic(Path(args.report) if args.report else HERE / "results_cpu.md", text)
    _, ok = table(rows, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

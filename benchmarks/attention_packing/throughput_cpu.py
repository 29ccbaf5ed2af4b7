"""CPU training throughput: padded batches vs padding-free (varlen attention) vs multipack.

A small Llama (fp32) is trained with a plain torch loop (AdamW) on random token ids whose
lengths follow a long-tailed distribution between 16 and 1024 tokens. Modes:

  (i)   padded: batches of k examples padded to the longest, sdpa + attention_mask;
  (ii)  padding-free: the same batches flattened by PaddingFreeCollator, varlen attention;
  (iii) padding-free + multipack: MultipackBatchSampler (one rank) with a token budget
        equal to the mean real tokens of the padded batches (at least the longest example);
  (iv)  optional (--with-sdpa-packed): the batches of (ii) with transformers' own sdpa,
        which builds a block-diagonal mask over the whole packed row.

Every mode sees every example exactly once. Steps of the modes are interleaved round-robin,
so load from other processes on a shared machine hits all modes alike. Throughput is
dataset (real, non-pad) tokens per second of training-step wall time.
The losses of the first steps of (i) and (ii) are compared: same weights, same batches.

Usage: python benchmarks/attention_packing/throughput_cpu.py [--examples 160]
           [--batch-size 8] [--out benchmarks/attention_packing/throughput_cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import numpy as np
import torch
import transformers  # noqa: E402

from accel_attention_packing.attention import (  # noqa: E402
    VARLEN_ATTENTION_NAME,
    disable_kv_cache,
    register_varlen_attention,
)
from accel_attention_packing.collator import PaddingFreeCollator  # noqa: E402
from accel_attention_packing.multipack import MultipackBatchSampler  # noqa: E402


def build_model(args: argparse.Namespace) -> transformers.PreTrainedModel:
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        vocab_size=args.vocab,
        max_position_embeddings=2048,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).train()
    disable_kv_cache(model)
    return model


def padded(examples: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
        labels[i, : len(e)] = ids[i, : len(e)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Mode:
    def __init__(self, name, model, attn, batches, lr):
        self.name = name
        self.model = model
        self.model.set_attn_implementation(attn)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.batches = batches  # list of (batch dict, real tokens, tokens fed)
        self.seconds = 0.0
        self.losses: list[float] = []
        self.real = 0
        self.fed = 0

    def warmup(self) -> None:
        batch = self.batches[0][0]
        self.model(**batch).loss.backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, i: int) -> None:
        batch, real, fed = self.batches[i]
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - start
        self.losses.append(loss.item())
        self.real += real
        self.fed += fed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--with-sdpa-packed", action="store_true")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    register_varlen_attention()

    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.lognormal(5.0, 0.9, args.examples), 16, 1024).astype(np.int64)
    data = [rng.integers(0, args.vocab, n).tolist() for n in lengths]
    order = rng.permutation(args.examples)
    k = args.batch_size
    groups = [order[i : i + k].tolist() for i in range(0, args.examples, k)]

    collate = PaddingFreeCollator()
    padded_batches, packed_batches = [], []
    for g in groups:
        ex = [data[i] for i in g]
        real = int(sum(len(e) for e in ex))
        pb = padded(ex)
        padded_batches.append((pb, real, int(pb["input_ids"].numel())))
        packed_batches.append((collate([{"input_ids": e} for e in ex]), real, real))
    budget = max(int(lengths.max()), int(np.mean([b[1] for b in padded_batches])))
    sampler = MultipackBatchSampler(lengths, max_tokens_per_rank=budget, seed=args.seed)
    multipack_batches = []
    for idx in sampler:
        real = int(lengths[idx].sum())
        multipack_batches.append((collate([{"input_ids": data[i]} for i in idx]), real, real))

    base = build_model(args)
    modes = [
        Mode("(i) padded, sdpa", copy.deepcopy(base), "sdpa", padded_batches, args.lr),
        Mode(
            f"(ii) padding-free, {VARLEN_ATTENTION_NAME}",
            copy.deepcopy(base),
            VARLEN_ATTENTION_NAME,
            packed_batches,
            args.lr,
        ),
        Mode(
            f"(iii) padding-free + multipack (budget {budget}), {VARLEN_ATTENTION_NAME}",
            copy.deepcopy(base),
            VARLEN_ATTENTION_NAME,
            multipack_batches,
            args.lr,
        ),
    ]
    if args.with_sdpa_packed:
        modes.append(
            Mode(
                "(iv) padding-free, transformers sdpa (block mask)",
                copy.deepcopy(base),
                "sdpa",
                packed_batches,
                args.lr,
            )
        )
    for m in modes:
        m.warmup()
    wall = time.perf_counter()
    for i in range(max(len(m.batches) for m in modes)):
        for m in modes:
            if i < len(m.batches):
                m.step(i)
        if i % 10 == 0:
            print(f"step {i}: " + ", ".join(f"{m.seconds:.1f}s" for m in modes), flush=True)
    wall = time.perf_counter() - wall

    first = min(5, len(modes[0].losses))
    diffs = [abs(a - b) for a, b in zip(modes[0].losses[:first], modes[1].losses[:first])]
    ref_tps = modes[0].real / modes[0].seconds
    params = sum(p.numel() for p in base.parameters())
    lines = [
        "# CPU training throughput: padded vs padding-free vs multipack",
        "",
        "- command: `python benchmarks/attention_packing/throughput_cpu.py "
        + " ".join(sys.argv[1:]).replace(" --out " + str(args.out), "")
        + "`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}), "
        f"torch {torch.__version__} ({args.threads} threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}",
        f"- model: Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.heads // 2} kv heads), vocab {args.vocab}, {params / 1e6:.1f}M parameters, "
        f"fp32, AdamW lr {args.lr}",
        f"- data: {args.examples} examples of random token ids, lengths lognormal(5.0, 0.9) "
        f"clipped to 16..1024 (mean {lengths.mean():.0f}, max {lengths.max()}), "
        f"{int(lengths.sum())} tokens; batches of {k} examples for (i)/(ii); steps "
        f"interleaved round-robin (total wall {wall:.0f} s)",
        "- tokens/s counts dataset (non-pad) tokens over training-step time "
        "(forward, backward, optimizer)",
        "",
        "| mode | steps | fed tokens (incl. pad) | time (s) | dataset tokens/s | vs padded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in modes:
        tps = m.real / m.seconds
        lines.append(
            f"| {m.name} | {len(m.batches)} | {m.fed} | {m.seconds:.1f} | {tps:.0f} "
            f"| {tps / ref_tps:.2f}x |"
        )
    lines += [
        "",
        f"Loss of the first {first} steps, (i) padded vs (ii) padding-free (same weights, "
        "same batches):",
        "",
        "| step | (i) padded | (ii) padding-free | abs diff |",
        "|---:|---:|---:|---:|",
    ]
    for s in range(first):
        a, b = modes[0].losses[s], modes[1].losses[s]
        lines.append(f"| {s} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |")
    lines += ["", f"Max abs loss difference over the first {first} steps: {max(diffs):.2e}"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()

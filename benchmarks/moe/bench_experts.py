"""Experts implementations side by side on CPU: one Mixtral experts block, or a whole model.

``--what block``: one experts block (hidden 512, intermediate 512, 16 experts, top-2, 4096
tokens by default), forward + backward. ``--what model``: a whole Mixtral (``--layers``
layers, vocabulary 8192, the same experts) on ``--tokens`` tokens as one sequence batch,
loss + backward. Each (implementation, threads) case runs in its own process, so the peak
memory it reports (``ru_maxrss`` growth after set-up) is its own; the cases run in
``--rounds`` interleaved rounds and the best time of each is kept, which is what survives
other load on a shared machine. Usage:

    python benchmarks/moe/bench_experts.py [--what block|model] [--tokens 4096] [--threads 1 2]
        [--rounds 2] [--repeats 2] [--skip batched_mm]

Prints a markdown table: best wall time of forward+backward (ms) and peak memory growth (MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

IMPLS = ("eager", "grouped_mm", "batched_mm", "scattermoe")


def _case(args: argparse.Namespace) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(args.threads)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from accel_moe.experts import register

    register()
    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    config._experts_implementation = args.case
    torch.manual_seed(0)
    if args.what == "model":
        from transformers import AutoModelForCausalLM

        config.num_hidden_layers = args.layers
        config.num_attention_heads, config.num_key_value_heads = 8, 4
        config.output_router_logits = True
        config.vocab_size = 8192  # keeps the LM head from dominating
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.set_experts_implementation(args.case)
        ids = torch.randint(0, config.vocab_size, (args.tokens // 512, 512))

        def step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

    else:
        experts = MixtralExperts(config)
        with torch.no_grad():
            experts.gate_up_proj.normal_(std=0.02)
            experts.down_proj.normal_(std=0.02)
        x = torch.randn(args.tokens, args.hidden, requires_grad=True)
        logits = torch.randn(args.tokens, args.experts)
        weights, index = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).requires_grad_()
        upstream = torch.randn(args.tokens, args.hidden)

        def step() -> None:
            out = experts(x, index, weights)
            out.backward(upstream)
            experts.zero_grad(set_to_none=True)
            x.grad = weights.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": min(times), "peak_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--what", choices=("block", "model"), default="block")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.threads = args.threads[0]
        print(json.dumps(_case(args)))
        return
    what = "one experts block" if args.what == "block" else f"a {args.layers}-layer Mixtral"
    shape = (
        f"{what}: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} "
        f"experts, top-{args.top_k}, {args.tokens} tokens, fp32, forward+backward"
    )
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            for impl in IMPLS:
                if impl in args.skip:
                    continue
                cmd = [sys.executable, __file__, "--case", impl, "--threads", str(threads)]
                for key in ("what", "tokens", "hidden", "intermediate", "experts", "layers"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                cmd += ["--top-k", str(args.top_k), "--repeats", str(args.repeats)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode:
                    best[impl, threads] = {"error": done.stderr.strip().splitlines()[-1]}
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                old = best.get((impl, threads))
                if old is None or result["ms"] < old["ms"]:
                    best[impl, threads] = {**result, "peak_mib": max(
                        result["peak_mib"], (old or {}).get("peak_mib", 0))}  # fmt: skip
    print(f"{shape}\n\n| implementation | threads | ms (best of {args.rounds} x {args.repeats}) "
          "| vs grouped_mm | peak MiB |\n|---|---|---|---|---|")  # fmt: skip
    for threads in args.threads:
        ref = best.get(("grouped_mm", threads), {}).get("ms")
        for impl in IMPLS:
            row = best.get((impl, threads))
            if row is None:
                print(f"| {impl} | {threads} | skipped | | |")
            elif "error" in row:
                print(f"| {impl} | {threads} | failed: {row['error']} | | |")
            else:
                ratio = f"{row['ms'] / ref:.2f}x" if ref else ""
                print(f"| {impl} | {threads} | {row['ms']:.0f} | {ratio} | {row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()

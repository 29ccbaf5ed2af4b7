"""One Mixtral experts block, forward + backward, per experts implementation (CPU).

Each (implementation, threads) case runs in its own process so the peak memory it reports
(``ru_maxrss`` growth over the process after set-up) is its own. Usage:

    python benchmarks/moe/bench_experts.py [--tokens 4096] [--hidden 512] [--intermediate 512]
        [--experts 16] [--top-k 2] [--threads 1 2] [--repeats 3] [--skip batched_mm]

Prints a markdown table: median wall time of fwd+bwd (ms) and the peak memory growth (MiB).
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
    import statistics
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
    return {"ms": statistics.median(times), "peak_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.threads = args.threads[0]
        print(json.dumps(_case(args)))
        return
    shape = (
        f"hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, "
        f"top-{args.top_k}, {args.tokens} tokens, fp32, forward+backward"
    )
    print(f"{shape}\n\n| implementation | threads | ms (median of {args.repeats}) | peak MiB |")
    print("|---|---|---|---|")
    for threads in args.threads:
        for impl in IMPLS:
            if impl in args.skip:
                print(f"| {impl} | {threads} | skipped | |")
                continue
            cmd = [sys.executable, __file__, "--case", impl, "--threads", str(threads)]
            cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden)]
            cmd += ["--intermediate", str(args.intermediate), "--experts", str(args.experts)]
            cmd += ["--top-k", str(args.top_k), "--repeats", str(args.repeats)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"| {impl} | {threads} | failed: {done.stderr.strip().splitlines()[-1]} | |")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {impl} | {threads} | {result['ms']:.0f} | {result['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()

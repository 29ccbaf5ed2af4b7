"""grouped_mm and scattermoe alternating in one process on one experts block (hidden 512,
intermediate 512, 16 experts, top-2, 4096 tokens, fp32, forward+backward): the fairest time
comparison on a shared machine, as both see the same load. Usage:

    python benchmarks/moe/alternate.py [THREADS] [ROUNDS]
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from accel_moe.experts import register

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.set_num_threads(threads)
    register()
    tokens, hidden, experts, top_k = 4096, 512, 16, 2
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=512,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
    )
    torch.manual_seed(0)
    block = MixtralExperts(config)
    with torch.no_grad():
        block.gate_up_proj.normal_(std=0.02)
        block.down_proj.normal_(std=0.02)
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights, index = torch.topk(torch.randn(tokens, experts).softmax(-1), top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).requires_grad_()
    upstream = torch.randn(tokens, hidden)

    def step(impl: str) -> float:
        config._experts_implementation = impl
        start = time.perf_counter()
        block(x, index, weights).backward(upstream)
        elapsed = (time.perf_counter() - start) * 1000
        block.zero_grad(set_to_none=True)
        x.grad = weights.grad = None
        return elapsed

    impls = ("grouped_mm", "scattermoe")
    for impl in impls:
        step(impl)  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            times[impl].append(step(impl))
    for impl, values in times.items():
        values.sort()
        print(f"{impl}: min {values[0]:.0f} ms, median {values[len(values) // 2]:.0f} ms")


if __name__ == "__main__":
    main()

"""Where one training step of the CPU benchmark's model spends its time: torch.profiler over
one forward + backward + AdamW step (after one warm-up step) of a configuration of
``bench_cpu.py``, built the way ``accel train`` builds it (the plugins' load_model and
augment_model hooks, then fused_ops' patches). Prints the operators by self CPU time.

    OMP_NUM_THREADS=1 python benchmarks/peft/profile_cpu.py --root /tmp/accel-peft-bench \
        --config "accel QLoRA + fused LoRA + fast kernels"

``--root`` is a folder ``bench_cpu.py`` prepared (its model, and its GPTQ checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import CONFIGS  # noqa: E402


def build(root: Path, flags: dict):
    import peft
    import torch
    from transformers import TrainingArguments

    from accel import AccelerationFramework
    from accel.trainer.loading import default_loader

    framework = AccelerationFramework.from_sources(flags=flags)
    path = root / ("gptq" if "auto_gptq" in flags else "model")
    model = framework.load_model(str(path), default=default_loader, dtype=torch.bfloat16)
    args = TrainingArguments(str(root / "profile-out"), report_to=[])
    config = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model, left = framework.augment_model(model, args, config)
    if left is not None:
        model = peft.get_peft_model(model, left)
    framework.apply_patches(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/accel-peft-bench")
    parser.add_argument("--config", default="accel QLoRA + fused LoRA + fast kernels")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = build(Path(args.root), CONFIGS[args.config])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(4, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up: compiles, caches, allocator
    start = time.perf_counter()
    step()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"## {args.config}\n")
    print(
        f"- one step without the profiler: {plain:.2f} s ({args.batch * args.seq / plain:.0f} "
        f"tokens/s), threads {torch.get_num_threads()}\n"
    )
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print("```")


if __name__ == "__main__":
    main()

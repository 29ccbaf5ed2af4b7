"""``accel moe export <checkpoint> <output>``: the Trainer checkpoint of a model sharded at load
time (``--fast_moe N``, ``fsdp_size``), which holds sharded torch.distributed.checkpoint state,
as a plain Hugging Face model. Runs in one process, no launcher."""

from __future__ import annotations

import argparse

HELP = (
    "turn a checkpoint-N of an expert-parallel (--fast_moe N) or fsdp_size run into a plain "
    "Hugging Face model (safetensors + config + tokenizer); one process, no torchrun"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint-N folder of such a run")
    parser.add_argument("output_dir", help="new folder for the plain model (must not exist)")


def run(args: argparse.Namespace) -> int:
    from accel_moe.export import export_checkpoint

    target = export_checkpoint(args.checkpoint, args.output_dir)
    print(f"accel: plain model written to {target}")
    return 0

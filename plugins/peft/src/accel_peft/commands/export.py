"""``accel export merged``: LoRA adapters merged into their (dequantized) base, saved as a
plain Hugging Face model."""

from __future__ import annotations

import argparse

HELP = "merge trained LoRA adapters into their base: a plain model AutoModelForCausalLM loads"
DESCRIPTION = (
    "merge LoRA adapters into their base: a 4-bit base (QLoRA, GPTQ-LoRA) is dequantized to the "
    "training dtype first; writes a plain checkpoint that AutoModelForCausalLM loads"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="folder of the saved adapters (save_model_dir)")
    parser.add_argument("output_dir", help="new folder for the merged model (must not exist)")
    parser.add_argument(
        "--torch_dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the merged weights (auto: the training dtype)",
    )


def run(args: argparse.Namespace) -> int:
    from accel_peft.export import export_merged

    dtype = None
    if args.torch_dtype != "auto":
        import torch

        dtype = getattr(torch, args.torch_dtype)
    target = export_merged(args.adapter_dir, args.output_dir, dtype)
    print(f"accel: merged model written to {target}")
    return 0

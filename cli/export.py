"""``accel export merged``: LoRA adapters merged into their (dequantized) base, saved as a
plain Hugging Face model (plugin package accel-peft)."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = (
    "merge LoRA adapters into their base: a 4-bit base (QLoRA, GPTQ-LoRA) is dequantized to the "
    "training dtype first; writes a plain checkpoint that AutoModelForCausalLM loads"
)


def add_parser(sub: Any, help_text: str) -> None:
    parser = sub.add_parser("export", help=help_text, description=help_text)
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    merged = kinds.add_parser("merged", help=DESCRIPTION, description=DESCRIPTION)
    merged.add_argument("adapter_dir", help="folder of the saved adapters (save_model_dir)")
    merged.add_argument("output_dir", help="new folder for the merged model (must not exist)")
    merged.add_argument(
        "--torch_dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the merged weights (auto: the training dtype)",
    )


def run_export(args: argparse.Namespace) -> int:
    from .quantize import peft_module

    export = peft_module("export")
    dtype = None
    if args.torch_dtype != "auto":
        import torch

        dtype = getattr(torch, args.torch_dtype)
    target = export.export_merged(args.adapter_dir, args.output_dir, dtype)
    print(f"accel: merged model written to {target}")
    return 0

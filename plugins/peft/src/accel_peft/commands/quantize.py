"""``accel quantize``: turn a local model into a GPTQ checkpoint with gptqmodel."""

from __future__ import annotations

import argparse

HELP = "quantize a local model to a GPTQ checkpoint (train on it with --auto_gptq triton_v2)"
DESCRIPTION = (
    "quantize a local model to a GPTQ checkpoint with gptqmodel, calibrated on a local data "
    "file (no hub access); train on the result with --auto_gptq triton_v2"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="folder of the full-precision model (save_pretrained)")
    parser.add_argument("output_dir", help="new folder for the GPTQ checkpoint (must not exist)")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight (2, 4 or 8; 4)")
    parser.add_argument(
        "--group_size", type=int, default=128, help="columns per scale group (-1 or 16..1024)"
    )
    parser.add_argument(
        "--calibration",
        required=True,
        help="calibration texts: .txt (one per line) or .json/.jsonl (a text field, else the "
        "string fields joined)",
    )
    parser.add_argument("--max_examples", type=int, default=128, help="calibration texts used")
    parser.add_argument("--max_length", type=int, default=512, help="tokens per text")


def run(args: argparse.Namespace) -> int:
    from accel_peft.quantize import quantize

    target = quantize(
        args.model_dir,
        args.output_dir,
        bits=args.bits,
        group_size=args.group_size,
        calibration=args.calibration,
        max_examples=args.max_examples,
        max_length=args.max_length,
    )
    print(f"accel: GPTQ checkpoint written to {target}")
    return 0

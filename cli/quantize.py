"""``accel quantize``: turn a local model into a GPTQ checkpoint (plugin package accel-peft)."""

from __future__ import annotations

import argparse
from typing import Any

from accel.errors import PluginNotInstalledError

DESCRIPTION = (
    "quantize a local model to a GPTQ checkpoint with gptqmodel, calibrated on a local data "
    "file (no hub access); train on the result with --auto_gptq triton_v2"
)


def add_parser(sub: Any, help_text: str) -> None:
    parser = sub.add_parser("quantize", help=help_text, description=DESCRIPTION)
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


def peft_module(name: str) -> Any:
    """``accel_peft.<name>``, or the install command when the plugin package is missing."""
    import importlib

    try:
        return importlib.import_module(f"accel_peft.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("accel_peft", f"accel_peft.{name}"):
            raise
        from accel.registry import catalog_for_name, missing_plugin_error

        entry = catalog_for_name("peft")
        raise missing_plugin_error(f"accel {name}", entry) from None  # type: ignore[arg-type]
    except PluginNotInstalledError:
        raise


def run_quantize(args: argparse.Namespace) -> int:
    quantize = peft_module("quantize")
    target = quantize.quantize(
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

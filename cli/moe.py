"""``accel moe export <checkpoint> <output>``: the Trainer checkpoint of a model sharded at load
time (``--fast_moe N``, ``fsdp_size``), which holds sharded torch.distributed.checkpoint state,
as a plain Hugging Face model. Runs in one process, no launcher. The implementation belongs to
the moe plugin (accel-moe), imported only when the command runs."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

EXPORT = (
    "turn a checkpoint-N of an expert-parallel (--fast_moe N) or fsdp_size run into a plain "
    "Hugging Face model (safetensors + config + tokenizer); one process, no torchrun"
)


def add_parser(sub: Any, help_text: str) -> None:
    parser = sub.add_parser("moe", help=help_text, description=help_text)
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    export = tools.add_parser("export", help=EXPORT, description=EXPORT)
    export.add_argument("checkpoint", help="a checkpoint-N folder of such a run")
    export.add_argument("output_dir", help="new folder for the plain model (must not exist)")


def run_moe(args: argparse.Namespace) -> int:
    export = _moe_export()
    target = export.export_checkpoint(args.checkpoint, args.output_dir)
    print(f"accel: plain model written to {target}")
    return 0


def _moe_export() -> Any:
    """``accel_moe.export``, or the install command when the plugin package is missing."""
    try:
        return importlib.import_module("accel_moe.export")
    except ModuleNotFoundError as err:
        if err.name not in ("accel_moe", "accel_moe.export"):
            raise
        from accel.registry import catalog_for_name, missing_plugin_error

        entry = catalog_for_name("moe")
        raise missing_plugin_error("accel moe export", entry) from None  # type: ignore[arg-type]

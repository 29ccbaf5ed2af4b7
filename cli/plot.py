"""``accel plot odm <output_dir>``: the mixing weights and probabilities of an online-mixing
run as a PNG. The drawing belongs to the odm plugin (accel-odm, with matplotlib as its
``plot`` extra); both are imported only when the command runs."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

KINDS = {"odm": "weights and probabilities per dataset vs step, from <output_dir>/odm.jsonl"}


def add_parser(sub: Any, help_text: str) -> None:
    parser = sub.add_parser("plot", help=help_text, description=help_text)
    parser.add_argument(
        "kind", choices=sorted(KINDS), help="what to plot: odm (" + KINDS["odm"] + ")"
    )
    parser.add_argument("output_dir", help="the output_dir of a training run")
    parser.add_argument(
        "--output", default=None, help="the PNG to write (default: <output_dir>/odm.png)"
    )


def run_plot(args: argparse.Namespace) -> int:
    plot = _odm_plot()
    target = plot.plot_run(args.output_dir, args.output)
    print(f"accel: plot written to {target}")
    return 0


def _odm_plot() -> Any:
    """``accel_odm.plot``, or the install command when the plugin package is missing."""
    try:
        return importlib.import_module("accel_odm.plot")
    except ModuleNotFoundError as err:
        if err.name not in ("accel_odm", "accel_odm.plot"):
            raise
        from accel.registry import catalog_for_name, missing_plugin_error

        entry = catalog_for_name("odm")
        raise missing_plugin_error("accel plot odm", entry) from None  # type: ignore[arg-type]

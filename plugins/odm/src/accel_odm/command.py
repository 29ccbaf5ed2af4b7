"""``accel plot odm <output_dir>``: the mixing weights and probabilities of an online-mixing
run as a PNG (matplotlib: the plugin's ``plot`` extra, imported when the command runs)."""

from __future__ import annotations

import argparse

HELP = "weights and probabilities per dataset vs step, from <output_dir>/odm.jsonl (PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="the output_dir of a training run with odm")
    parser.add_argument(
        "--output", default=None, help="the PNG to write (default: <output_dir>/odm.png)"
    )


def run(args: argparse.Namespace) -> int:
    from accel_odm.plot import plot_run

    target = plot_run(args.output_dir, args.output)
    print(f"accel: plot written to {target}")
    return 0

"""``accel plot loss <output_dir> [<output_dir> ...]``: loss, learning rate, gradient norm and
tokens/s of one or several runs as one PNG (see :mod:`accel.plots`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dirs", nargs="+", help="output_dir of each run to draw")
    parser.add_argument(
        "--output", default=None, help="the PNG to write (default: <first output_dir>/loss.png)"
    )


def run(args: argparse.Namespace) -> int:
    from accel.plots import plot_runs

    target = plot_runs(args.output_dirs, args.output)
    print(f"accel: plot written to {target}")
    return 0

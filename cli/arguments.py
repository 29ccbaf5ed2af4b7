"""``accel arguments <config>``: the flags equivalent to an acceleration config."""

from __future__ import annotations

from typing import Any


def add_arguments(parser: Any) -> None:
    parser.add_argument("config", help="a sample name from `accel configs` or a YAML file path")


def run(args: Any) -> int:
    from .configs import run_arguments

    return run_arguments(args)

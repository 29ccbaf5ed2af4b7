"""``accel train``: the thin trainer from the command line."""

from __future__ import annotations

from collections.abc import Sequence

RAW_ARGS = True  # the trainer parses its own (large) argument set


def run_train(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from accel.trainer.parsing import build_parser

        build_parser().print_help()
        return 0
    from accel.trainer.run import main_from_argv

    main_from_argv(argv)
    return 0


run = run_train

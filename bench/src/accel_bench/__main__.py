"""``python -m accel_bench <scenario.yaml> --output <dir>``: the same as ``accel bench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from accel.cli.main import main as accel_main

    return accel_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

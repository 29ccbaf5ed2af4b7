"""``accel corpus <folder>``: build the real-text corpus (see :mod:`accel_bench.corpus`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "build the real-text multi-domain corpus and its tokenizer into a folder"
DESCRIPTION = (
    "build a deterministic multi-domain corpus (Python source, C/C++ headers, prose, licences, "
    "config files, and a noise control) from the files of this environment, split by document "
    "into train/validation/held_out, with a BPE tokenizer and a --data_config; ends with "
    "`corpus sha256 <hex>`"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="output folder (replaced whole if it exists)")
    parser.add_argument("--chunk-chars", type=int, default=1000, help="characters per example")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every budget")


def run(args: argparse.Namespace) -> int:
    from accel.errors import ConfigError

    for name in ("chunk_chars", "vocab_size", "scale"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    if Path(args.folder).is_file():
        raise ConfigError(f"{args.folder} is a file: give a folder for the corpus")
    from .corpus import build, size_table

    built = build(
        args.folder,
        scale=args.scale,
        chunk_chars=args.chunk_chars,
        vocab_size=args.vocab_size,
        log=print,
    )
    print(size_table(built.manifest))
    print(f"built in {built.manifest['build_seconds']} s")
    print(f"corpus sha256 {built.sha256}")
    return 0

"""Entry point of ``accel``: parses the subcommand and imports only what it needs.

``accel --help`` must stay fast, so nothing heavy (torch, transformers) is imported here;
each subcommand lives in its own module and is imported when chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from accel.version import __version__

COMMANDS = {
    "plugins": "list installed plugins and the ones this checkout can install",
    "install": "install plugins (from this checkout's plugins/ folder, else by package name)",
    "configs": "list the sample acceleration configs shipped with accel",
    "arguments": "print the command-line flags equivalent to an acceleration config",
    "train": "fine-tune a model (see `accel train --help`); `accel train --demo` runs the demo",
    "quantize": "quantize a local model to a GPTQ checkpoint (plugin package accel-peft)",
    "export": "export trained adapters: `accel export merged <adapter_dir> <output_dir>`",
    "plot": "plot a run: `accel plot odm <output_dir>` draws the online-mixing weights as a PNG",
    "bench": "run a fine-tuning experiment matrix from a scenario YAML (see docs/bench.md)",
    "moe": "MoE tools: `accel moe export <checkpoint> <output_dir>` (sharded checkpoint -> HF)",
}


class _Parser(argparse.ArgumentParser):
    """Errors are one ``accel: error:`` line (a ConfigError), not a usage dump; no
    abbreviations (``--dry`` is not ``--dry-run``), the same as in config files."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(allow_abbrev=False, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        from accel.errors import raise_argparse_error

        raise_argparse_error(message, self.prog)

    def parse_args(self, args: Sequence[str] | None = None, namespace: object = None) -> object:  # type: ignore[override]
        """Unknown arguments are named with the closest option of the chosen subcommand."""
        from accel.errors import ConfigError, did_you_mean

        parsed, extra = self.parse_known_args(args, namespace)  # type: ignore[arg-type]
        if not extra:
            return parsed
        command = getattr(parsed, "command", None)
        parser = self._subparsers_action.choices.get(command, self) if command else self
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        raise ConfigError(
            f"unknown argument '{extra[0]}'.{did_you_mean(extra[0], options)} "
            f"Run `{parser.prog} --help` for the options."
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="accel",
        description="Plugin-based acceleration for fine-tuning LLMs with Hugging Face.",
    )
    parser.add_argument("--version", action="version", version=f"accel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._subparsers_action = sub
    plugins = sub.add_parser("plugins", help=COMMANDS["plugins"], description=COMMANDS["plugins"])
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    install = sub.add_parser("install", help=COMMANDS["install"], description=COMMANDS["install"])
    install.add_argument(
        "names", nargs="+", metavar="PLUGIN", help="e.g. fused_ops attention_packing"
    )
    install.add_argument("--dry-run", action="store_true", help="print the pip command only")
    install.add_argument(
        "--editable", "-e", action="store_true", help="editable install from the checkout"
    )
    sub.add_parser("configs", help=COMMANDS["configs"], description=COMMANDS["configs"])
    arguments = sub.add_parser(
        "arguments", help=COMMANDS["arguments"], description=COMMANDS["arguments"]
    )
    arguments.add_argument("config", help="a sample name from `accel configs` or a YAML file path")
    sub.add_parser("train", help=COMMANDS["train"], add_help=False)
    from .bench import add_parser as add_bench
    from .export import add_parser as add_export
    from .moe import add_parser as add_moe
    from .plot import add_parser as add_plot
    from .quantize import add_parser as add_quantize

    add_quantize(sub, COMMANDS["quantize"])
    add_export(sub, COMMANDS["export"])
    add_plot(sub, COMMANDS["plot"])
    add_bench(sub, COMMANDS["bench"])
    add_moe(sub, COMMANDS["moe"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from accel.quiet import silence_library_noise

    silence_library_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # the trainer parses its own (large) argument set
        return _run("train", argv[1:])
    return _run(None, argv)


def _run(command: str | None, args: object) -> int:
    from accel.errors import AccelError

    try:
        if command is None:
            args = build_parser().parse_args(args)  # type: ignore[arg-type]
            command = args.command  # type: ignore[attr-defined]
            if command is None:
                build_parser().print_help()
                return 0
        if command == "train":
            from .train import run_train

            return run_train(args)
        if command == "plugins":
            from .plugins import run_plugins

            return run_plugins(args)
        if command == "install":
            from .install import run_install

            return run_install(args)
        if command == "quantize":
            from .quantize import run_quantize

            return run_quantize(args)
        if command == "export":
            from .export import run_export

            return run_export(args)
        if command == "bench":
            from .bench import run_bench

            return run_bench(args)
        if command == "plot":
            from .plot import run_plot

            return run_plot(args)
        if command == "moe":
            from .moe import run_moe

            return run_moe(args)
        from .configs import run_arguments, run_configs

        return run_configs(args) if command == "configs" else run_arguments(args)
    except AccelError as err:
        if _reports_errors():
            print(f"accel: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130


def _reports_errors() -> bool:
    """Under torchrun / accelerate launch every process checks the same arguments and fails
    the same way: only local rank 0 prints the error (one line per node), the others just
    exit with the same status."""
    return os.environ.get("LOCAL_RANK", "0") == "0"

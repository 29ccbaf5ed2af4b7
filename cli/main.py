"""Entry point of ``accel``: parses the subcommand and imports only what it needs.

``accel --help`` must stay fast, so nothing heavy (torch, transformers) is imported here;
each subcommand lives in its own module and is imported when chosen.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from accel.version import __version__

from .commands import CommandSpec, command_specs, summary, top_level

#: The core's commands, one row each: name -> (module, one line for `accel --help`). A module
#: defines HELP, optionally DESCRIPTION and add_arguments(parser), and run(args) -> int (see
#: accel.cli.commands); "plot.loss" is the sub-command `accel plot loss`. Installed packages
#: add theirs through the `accel.commands` entry-point group, the same way.
CORE_COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": (
        "accel.cli.plugins",
        "list installed plugins and the ones this checkout can install",
    ),
    "install": ("accel.cli.install", "install plugins (from this checkout, else by package name)"),
    "configs": ("accel.cli.configs", "list the sample acceleration configs shipped with accel"),
    "arguments": ("accel.cli.arguments", "print the flags equivalent to an acceleration config"),
    "train": (
        "accel.cli.train",
        "fine-tune a model (`accel train --help`); `--demo` runs the demo",
    ),
    "launch": ("accel.cli.launch", "`accel train` over torchrun: N processes, M machines"),
    "plot.loss": ("accel.cli.plot_loss", "loss, learning rate, grad norm, tokens/s of runs (PNG)"),
    "new.plugin": ("accel.cli.new_plugin", "write an installable plugin package to start from"),
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


def build_parser(
    specs: dict[str, CommandSpec] | None = None, chosen: str | None = None
) -> argparse.ArgumentParser:
    """The parser of every command; only the ``chosen`` command's modules are imported (none
    for ``accel --help``)."""
    specs = command_specs(CORE_COMMANDS) if specs is None else specs
    parser = _Parser(
        prog="accel",
        description="Plugin-based acceleration for fine-tuning LLMs with Hugging Face.",
        epilog=_not_installed_epilog(specs),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"accel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._subparsers_action = sub
    for word, group in top_level(specs).items():
        text = summary(word, group)
        if word != chosen:
            sub.add_parser(word, help=text, add_help=False)
            continue
        if len(group) == 1 and len(group[0].words) == 1:
            _add_command(sub, word, group[0])
            continue
        command = sub.add_parser(word, help=text, description=text)
        kinds = command.add_subparsers(dest="kind", required=True)
        command._subparsers_action = kinds
        for spec in group:
            _add_command(kinds, " ".join(spec.words[1:]), spec)
    return parser


def _add_command(sub: Any, word: str, spec: CommandSpec) -> None:
    module = spec.load()
    text = spec.help or module.HELP  # the core's table gives it, a plugin's module declares it
    parser = sub.add_parser(word, help=text, description=getattr(module, "DESCRIPTION", text))
    parser.set_defaults(_module=module)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)


def _not_installed_epilog(specs: dict[str, CommandSpec]) -> str:
    from accel.registry import CATALOG, install_command

    lines = [
        f"  accel {name.replace('.', ' ')}: {install_command(entry)}"
        for entry in CATALOG
        for name in entry.commands
        if name not in specs
    ]
    return "commands of packages that are not installed:\n" + "\n".join(lines) if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    from accel.threads import configure

    configure()  # CPU thread defaults: before anything imports torch (OpenMP reads them once)
    from accel.quiet import silence_library_noise

    silence_library_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    from accel.errors import AccelError

    try:
        return _run(argv)
    except AccelError as err:
        from .launch import hand_to_launcher  # under `accel launch` the launcher prints it

        if not hand_to_launcher(str(err)) and _reports_errors():
            for line in str(err).splitlines() or [""]:  # several problems: a line each
                print(f"accel: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    specs = command_specs(CORE_COMMANDS)
    chosen = argv[0] if argv and not argv[0].startswith("-") else None
    if chosen is not None:
        _check_installed(specs, argv)
        spec = specs.get(chosen)
        if spec is not None:
            module = spec.load()
            if getattr(module, "RAW_ARGS", False):  # accel train parses its own arguments
                return module.run(argv[1:])
    args = build_parser(specs, chosen).parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        build_parser(specs).print_help()
        return 0
    return module.run(args)


def _check_installed(specs: dict[str, CommandSpec], argv: list[str]) -> None:
    """A command (or sub-command) of a first-party package that is not installed is one
    error naming the install command, before anything loads."""
    from accel.registry import CATALOG, missing_plugin_error

    groups = top_level(specs)
    word = argv[0]
    if word in groups:
        if len(groups[word]) == 1 and len(groups[word][0].words) == 1:
            return  # a plain command
        if len(argv) < 2 or argv[1].startswith("-"):
            return
        wanted = f"{word}.{argv[1]}"
        if wanted in specs:
            return
    else:
        wanted = word
    for entry in CATALOG:
        for name in entry.commands:
            if name == wanted or (wanted == word and name.split(".")[0] == word):
                raise missing_plugin_error(f"`accel {wanted.replace('.', ' ')}`", entry)


def _reports_errors() -> bool:
    """Under torchrun / accelerate launch every process checks the same arguments and fails
    the same way: only local rank 0 prints the error (one line per node), the others just
    exit with the same status."""
    return os.environ.get("LOCAL_RANK", "0") == "0"

"""Parse the trainer's arguments from argv, a JSON/YAML file, or keyword arguments.

All three end in the same :class:`TrainConfig`. Acceleration flags (``--fast_kernels``,
``--padding_free`` ...) are collected separately as lists of values (in a config file
each takes a list, as in fms-hf-tuning); unknown names are errors with a suggestion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, did_you_mean, raise_argparse_error
from ..registry import PluginInfo, all_flag_names, discover_plugins, installed_flags
from .arguments import (
    AccelerationArguments,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    TuningArguments,
)

ARGUMENT_CLASSES = (
    ModelArguments,
    DataArguments,
    TuningArguments,
    AccelerationArguments,
    TrainingArguments,
)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class TrainConfig:
    model: ModelArguments
    data: DataArguments
    tuning: TuningArguments
    acceleration: AccelerationArguments
    training: TrainingArguments
    flags: dict[str, list[Any]] = field(default_factory=dict)
    demo: bool = False
    #: plugin options in the fms-acceleration layout (the run config's ``plugins:`` key)
    plugins: dict[str, Any] | None = None
    #: the options typed on the command line (they override the run config file's, plugin
    #: options under ``plugins:`` or in an acceleration config included)
    command_line: frozenset[str] = frozenset()


def _field_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def _hf_parser() -> Any:
    from transformers import HfArgumentParser

    class TrainParser(HfArgumentParser):
        """No abbreviations (a config file takes none either); errors are one ConfigError
        line, not a usage dump."""

        def error(self, message: str) -> NoReturn:
            raise_argparse_error(message, self.prog)

    return TrainParser(ARGUMENT_CLASSES, allow_abbrev=False)


def build_parser(available: Mapping[str, PluginInfo] | None = None) -> argparse.ArgumentParser:
    """The full ``accel train`` parser: trainer fields plus every known acceleration flag."""
    available = discover_plugins() if available is None else available
    parser = _hf_parser()
    parser.prog = "accel train"
    parser.description = (
        "Fine-tune a causal LM. Pass options as flags, or a JSON/YAML run config file "
        "first, optionally followed by flags that override it. "
        "Acceleration flags come from the installed plugins (see `accel plugins`)."
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Train the embedded tiny model on the embedded dataset (no download).",
    )
    group = parser.add_argument_group("acceleration flags")
    declared = installed_flags(available)
    for name in all_flag_names(available):
        flag = declared.get(name, (None, None))[0]
        help_text = (
            flag.help if flag else "(plugin not installed: `accel plugins` says how to add it)"
        )
        metavar = flag.fields if flag else None
        group.add_argument(
            f"--{name}",
            nargs="*" if flag and flag.is_switch else "+",
            default=None,
            help=help_text,
            metavar=metavar[0] if metavar and len(metavar) == 1 else None,
        )
    return parser


def parse_argv(
    argv: Sequence[str], available: Mapping[str, PluginInfo] | None = None
) -> TrainConfig:
    """``[RUN_CONFIG] [--flag value ...]``: flags override the run config file's values.

    Only the options actually given are taken from the command line, and they go through
    :func:`parse_mapping` like a config file's, so both are validated the same way."""
    available = discover_plugins() if available is None else available
    argv = list(argv)
    data: dict[str, Any] = {}
    origin = "arguments"
    if argv and not argv[0].startswith("-"):
        origin = argv.pop(0)
        data = read_config_file(origin)
    given = given_options(build_parser(available), argv)
    data.update(given)
    config = parse_mapping(data, available, origin=origin)
    config.command_line = frozenset(given)
    return config


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The options present in ``argv`` (typed by the parser), without the defaults."""
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    namespace, rest = parser.parse_known_args(list(argv))
    if rest:
        bad = next((r for r in rest if r.startswith("-")), rest[0])
        if not bad.startswith("-") and bad.endswith(CONFIG_SUFFIXES):
            raise ConfigError(
                f"'{bad}': a run config file comes first: accel train {bad} [--flag value ...]"
            )
        options = {a.option_strings[0] for a in parser._actions if a.option_strings}
        raise ConfigError(
            f"unknown argument '{bad}'.{did_you_mean(bad.split('=')[0], options)} "
            "Run `accel train --help` for the options."
        )
    return vars(namespace)


def read_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML run config (a mapping of argument names to values)."""
    target = Path(path)
    kinds = ", ".join(CONFIG_SUFFIXES)
    if target.is_dir():
        raise ConfigError(
            f"run config '{path}' is a folder; pass a run config file ({kinds}) or flags"
        )
    if not target.exists():
        if target.suffix in CONFIG_SUFFIXES:
            raise ConfigError(f"run config file '{path}' does not exist")
        raise ConfigError(
            f"'{path}' is neither an option (they start with --) nor a run config file "
            f"({kinds}). Run `accel train --help` for the options."
        )
    if target.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(
            f"run config '{path}' must be JSON or YAML, named with {kinds} "
            f"(got '{target.suffix or 'no suffix'}')"
        )
    if target.suffix == ".json":
        try:
            data = json.loads(target.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    else:
        from ..config import read_yaml

        data = read_yaml(target)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of argument names to values")
    return data


def parse_mapping(
    data: Mapping[str, Any],
    available: Mapping[str, PluginInfo] | None = None,
    origin: str = "arguments",
) -> TrainConfig:
    """Parse ``{argument: value}`` (a config file or ``accel.train(**kwargs)``)."""
    available = discover_plugins() if available is None else available
    flag_names = set(all_flag_names(available))
    fields = _field_names()
    data = dict(data)
    has_plugins = "plugins" in data
    plugins = data.pop("plugins", None)
    if has_plugins and plugins is None:
        plugins = {}  # a bare `plugins:` is reported as empty, not ignored
    demo = bool(data.pop("demo", False))
    if demo:
        from .demo import demo_arguments, demo_assets

        data = {**demo_arguments(demo_assets(), output_dir=data.get("output_dir")), **data}
    for key in data:
        if key not in fields and key not in flag_names:
            raise ConfigError(
                f"{origin}: unknown argument '{key}'.{did_you_mean(key, fields | flag_names)}"
            )
    flags = {}
    for name in flag_names & set(data):
        value = data.pop(name)
        if value is not None:
            flags[name] = list(value) if isinstance(value, (list, tuple)) else [value]
    config = _assemble(data, flags, demo, origin)
    config.plugins = plugins
    return config


def _assemble(
    values: Mapping[str, Any], flags: dict[str, list[Any]], demo: bool, origin: str
) -> TrainConfig:
    """Split ``values`` over the argument dataclasses and build each one."""
    objs = []
    for cls in ARGUMENT_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        objs.append(_construct(cls, {k: v for k, v in values.items() if k in names}, origin))
    return TrainConfig(*objs, flags=flags, demo=demo)


def _construct(cls: type, values: dict[str, Any], origin: str = "arguments") -> Any:
    """Build one argument dataclass; ours are type-checked field by field (Literal choices
    included), transformers' TrainingArguments validates itself in ``__post_init__``."""
    if cls is not TrainingArguments:
        from ..schema import build_config

        return build_config(cls, values, origin, coerce=True)
    values = _coerce_scalars(cls, values, origin)
    from .distributed import prepare_training_values

    prepare_training_values(values)  # before __post_init__ sets up accelerate's state
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {_explain(err, values)}") from None


def _explain(err: Exception, values: Mapping[str, Any]) -> str:
    """transformers' "x is not a valid SaveStrategy, please select one of [...]" names no key:
    add the key and the closest choice."""
    match = re.match(r"(.+) is not a valid \w+, please select one of \[(.*)\]", str(err))
    if not match:
        return str(err)
    value, choices = match[1], [c.strip(" '") for c in match[2].split(",")]
    key = next((k for k, v in values.items() if str(v) == value), None)
    return (
        f"{key or 'a value'}: got '{value}', expected one of {', '.join(map(repr, choices))}."
        f"{did_you_mean(value, choices)}"
    )


_SCALARS = (bool, int, float)


def _coerce_scalars(cls: type, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Numbers and booleans of transformers' TrainingArguments: a string is converted as on
    the command line (``"1e-3"`` is 0.001 in a config file too), anything else of the wrong
    type is an error naming the key."""
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(options) != 1 or options[0] not in _SCALARS:
            continue
        if value is None:
            if type(None) in typing.get_args(hint):
                continue
            kind = {bool: "true or false", int: "an integer", float: "a number"}[options[0]]
            raise ConfigError(f"{origin}: {name}: got null, expected {kind}")
        out[name] = _scalar(name, value, options[0], origin)
    return out


def _scalar(name: str, value: Any, kind: type, origin: str) -> Any:
    expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in ("true", "yes", "y", "t", "on", "1"):
            return True
        if text in ("false", "no", "n", "f", "off", "0"):
            return False
    elif not isinstance(value, bool):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    raise ConfigError(f"{origin}: {name}: got {value!r}, expected {expected}")

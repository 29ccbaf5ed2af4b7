"""Parse the trainer's arguments from argv, a JSON/YAML file, or keyword arguments.

All three end in the same :class:`TrainConfig`. Acceleration flags (``--fast_kernels``,
``--padding_free`` ...) are collected separately as lists of values (in a config file
each takes a list, as in fms-hf-tuning); unknown names are errors with a suggestion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean
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


def _field_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def _hf_parser() -> Any:
    from transformers import HfArgumentParser

    return HfArgumentParser(ARGUMENT_CLASSES)


def build_parser(available: Mapping[str, PluginInfo] | None = None) -> argparse.ArgumentParser:
    """The full ``accel train`` parser: trainer fields plus every known acceleration flag."""
    available = discover_plugins() if available is None else available
    parser = _hf_parser()
    parser.prog = "accel train"
    parser.description = (
        "Fine-tune a causal LM. Pass options as flags, or a single JSON/YAML config file. "
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
            nargs="+",
            default=None,
            help=help_text,
            metavar=metavar[0] if metavar and len(metavar) == 1 else None,
        )
    return parser


def parse_argv(
    argv: Sequence[str], available: Mapping[str, PluginInfo] | None = None
) -> TrainConfig:
    available = discover_plugins() if available is None else available
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        return parse_mapping(read_config_file(argv[0]), available, origin=argv[0])
    parser = build_parser(available)
    if "--demo" in argv:
        from .demo import demo_arguments, demo_assets

        parser.set_defaults(**demo_arguments(demo_assets()))
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        bad = next((r for r in rest if r.startswith("-")), rest[0])
        options = [a.lstrip("-") for a in parser._option_string_actions if a.startswith("--")]
        raise ConfigError(
            f"unknown argument '{bad}'.{did_you_mean(bad.lstrip('-'), options)} "
            "Run `accel train --help` for the list."
        )
    values = vars(namespace)
    given = {name: values.pop(name, None) for name in all_flag_names(available)}
    flags = {name: value for name, value in given.items() if value is not None}
    demo = values.pop("demo")
    return _assemble(values, flags, demo, "arguments")


def read_config_file(path: str) -> dict[str, Any]:
    target = Path(path)
    if not target.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
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

        data = {**demo_arguments(demo_assets()), **data}
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
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {err}") from None

"""``accel configs`` and ``accel arguments``: the shipped sample configs and their flags."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from accel.config import collect_sections, load_acceleration_config
from accel.errors import ConfigError, did_you_mean
from accel.flags import installed_flags
from accel.registry import (
    catalog_for_path,
    discover_plugins,
    known_paths,
    missing_plugin_error,
    path_owners,
)


def sample_dir() -> Path:
    return Path(str(resources.files("accel.configs")))


def samples() -> dict[str, Path]:
    return {p.stem: p for p in sorted(sample_dir().glob("*.yaml"))}


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def run_configs(args: Any) -> int:
    found = samples()
    width = max((len(n) for n in found), default=0)
    print(f"Sample acceleration configs ({sample_dir()}):")
    for name, path in found.items():
        print(f"  {name:<{width}}  {_description(path)}")
    print(
        "\nUse one with `accel train --acceleration_config <file> ...`; "
        "`accel arguments <name>` prints the equivalent flags."
    )
    return 0


def resolve_config(name: str) -> Path:
    found = samples()
    if name in found:
        return found[name]
    if Path(name).is_file():
        return Path(name)
    raise ConfigError(
        f"'{name}' is neither a sample config nor a file.{did_you_mean(name, found)} "
        f"Samples: {', '.join(found)}"
    )


def config_to_flags(path: Path) -> tuple[list[str], list[str]]:
    """Return (flags, paths no flag can express) for an acceleration config file."""
    available = discover_plugins()
    owners = path_owners(available)
    sections = collect_sections(load_acceleration_config(path), known_paths(owners))
    by_path = {flag.path: flag for flag, _ in installed_flags(available).values()}
    flags, leftover = [], []
    for cfg_path, sub in sections.items():
        if cfg_path not in owners:
            raise missing_plugin_error(
                f"config path 'plugins.{cfg_path}'", catalog_for_path(cfg_path)
            )
        flag = by_path.get(cfg_path)
        schema = owners[cfg_path].cls.schema_for(cfg_path)
        values = flag.to_values(sub or {}, schema) if flag else None
        if values is None:
            leftover.append(cfg_path)
        else:
            flags.append(" ".join([f"--{flag.name}", *values]))
    return flags, leftover


def run_arguments(args: Any) -> int:
    path = resolve_config(args.config)
    flags, leftover = config_to_flags(path)
    print(" ".join(flags))
    if leftover:
        print(
            f"# no flag expresses {', '.join('plugins.' + p for p in leftover)}; also pass "
            f"--acceleration_config {path}"
        )
    return 0

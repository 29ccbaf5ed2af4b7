"""Command-line flags that switch plugins on (fms-hf-tuning's names).

Installed plugins declare their flags (:class:`accel.Flag`); the first-party catalog names
the flags of plugins that are not installed so that using one gives the install command.
Every flag maps to one config path, so flags for the same plugin compose: for example
``--fast_kernels`` and ``--fused_lora`` fill two different paths of ``fused_ops``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .plugin import Flag
from .registry import CATALOG, PluginInfo, catalog_for_flag, missing_plugin_error


def installed_flags(available: Mapping[str, PluginInfo]) -> dict[str, tuple[Flag, PluginInfo]]:
    table: dict[str, tuple[Flag, PluginInfo]] = {}
    for info in available.values():
        for flag in info.cls.flags:
            if flag.name in table:
                other = table[flag.name][1]
                raise ConfigError(
                    f"flag --{flag.name} is declared by two plugins: '{other.name}' "
                    f"({other.distribution}) and '{info.name}' ({info.distribution})"
                )
            table[flag.name] = (flag, info)
    return table


def all_flag_names(available: Mapping[str, PluginInfo]) -> list[str]:
    names = set(installed_flags(available))
    names.update(f for entry in CATALOG for f in entry.flags)
    return sorted(names)


def sections_from_flags(
    values: Mapping[str, Sequence[Any] | Any | None], available: Mapping[str, PluginInfo]
) -> dict[str, dict[str, Any]]:
    """Turn ``{flag: values}`` into ``{config path: sub-config}``; ``None`` values are unset."""
    table = installed_flags(available)
    sections: dict[str, dict[str, Any]] = {}
    for name, raw in values.items():
        if raw is None:
            continue
        if name not in table:
            entry = catalog_for_flag(name)
            if entry is not None:
                raise missing_plugin_error(f"--{name}", entry)
            raise ConfigError(f"unknown acceleration flag --{name}")
        flag, _ = table[name]
        items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        sub = flag.to_config(items)
        if sub is None:
            continue
        merge_into(sections, flag.path, dict(sub), f"--{name}")
    return sections


def merge_into(
    sections: dict[str, dict[str, Any]], path: str, sub: dict[str, Any], origin: str
) -> None:
    """Merge ``sub`` into ``sections[path]``; two sources giving one key different values is an error."""
    current = sections.setdefault(path, {})
    for key, value in sub.items():
        if key in current and current[key] != value:
            raise ConfigError(
                f"{origin} sets plugins.{path}.{key}={value!r}, but it is already set to "
                f"{current[key]!r} elsewhere (config file or another flag); give one value"
            )
        current[key] = value

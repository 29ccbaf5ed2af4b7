"""Where plugin options come from, and the one place they are merged.

A run's plugin options come from up to three sources: the acceleration config
(``--acceleration_config``: a YAML file or a sample name), a ``plugins:`` mapping inside the
run config (run.json / run.yaml / ``accel.train(plugins=...)``), and the acceleration flags
(``--fast_kernels True True True``). All use fms-acceleration's paths.

Each source's values are type-checked against the plugin's schema *before* merging, so the
comparison is typed: ``--fast_kernels True True True`` and ``fast_loss: true`` in the YAML
agree. The command line overrides the files (as it does for every other option of a run):
a flag typed there replaces the same key from the run config's ``plugins:`` or the
acceleration config; two files, or two flags, giving one key different values is an error
naming both.

Flag values are read like command-line words wherever they come from (``"True"`` and
``true`` both mean true, as in fms-hf-tuning's JSON flag lists); values under ``plugins:``
must already have their type (``fast_loss: "true"`` is an error), as YAML and JSON can say so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ROOT, collect_sections, load_acceleration_config
from .discovery import unavailable_error
from .errors import ConfigError, Problems
from .registry import (
    PluginInfo,
    catalog_for_flag,
    catalog_for_path,
    installed_flags,
    known_paths,
    missing_plugin_error,
    path_owners,
)
from .schema import build_config, convert_fields


@dataclass(frozen=True)
class Source:
    """Options from one place: ``{config path: {key: value}}`` and how to read the values."""

    origin: str  # how messages name it: "--fast_kernels", "acceleration config 'a.yaml'"
    sections: Mapping[str, Any] = field(default_factory=dict)
    coerce: bool = False  # values are command-line words (flags)
    #: given on the command line: its values override the same keys from any file
    overrides: bool = False


def gather_sources(
    acceleration_config: str | Path | Mapping[str, Any] | None = None,
    *,
    plugins: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    available: Mapping[str, PluginInfo],
    command_line: Collection[str] = (),
    problems: Problems | None = None,
) -> list[Source]:
    """The sources of one run, in the order their options are merged.

    ``acceleration_config`` is a file, a sample name or a mapping with a ``plugins:`` root;
    ``plugins`` is the run config's ``plugins:`` tree; ``flags`` maps flag names to their
    values; ``sections`` is ``{path: sub-config}`` already split from flags; the flags named
    in ``command_line`` were typed on the command line (they override the files). A flag's
    problem goes into ``problems`` when given (the other sources are still returned, so that
    their problems are found too), else it is raised.
    """
    known = known_paths(path_owners(available))
    found: list[Source] = []
    if acceleration_config is not None:
        tree, origin = load_acceleration_config(acceleration_config)
        found.append(_tree_source(tree, origin, known))
    if plugins is not None:
        origin = f"the run config's '{ROOT}'"
        if not isinstance(plugins, Mapping):
            raise ConfigError(f"{origin}: expected a mapping of config paths, got {plugins!r}")
        if not plugins:
            raise ConfigError(
                f"{origin} is empty; name a plugin config path under it (`accel plugins` "
                "lists each plugin's paths) or remove it"
            )
        found.append(_tree_source(plugins, origin, known))
    found.extend(flag_sources(flags or {}, available, command_line, problems))
    if sections:
        found.append(Source("a flag", dict(sections), coerce=True))
    return found


def _tree_source(tree: Mapping[str, Any], origin: str, known: set[str]) -> Source:
    try:
        sections = collect_sections(tree, known)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    if not sections:
        raise ConfigError(
            f"{origin} names no plugin config path under '{ROOT}:'; known paths: "
            f"{', '.join(sorted(known))}"
        )
    return Source(origin, sections)


def flag_sources(
    values: Mapping[str, Any],
    available: Mapping[str, PluginInfo],
    command_line: Collection[str] = (),
    problems: Problems | None = None,
) -> list[Source]:
    """One source per flag given (``None`` = not given); a single value stands for a list.
    Every flag's problem is reported (into ``problems`` when given, else raised together),
    not only the first one's."""
    table = installed_flags(available)
    found_problems = Problems() if problems is None else problems
    found = []
    for name, raw in values.items():
        if raw is None:
            continue
        source = found_problems.check(_flag_source, name, raw, table, name in command_line)
        if source is not None:
            found.append(source)
    if problems is None:
        found_problems.raise_any()
    return found


def _flag_source(name: str, raw: Any, table: Mapping[str, Any], overrides: bool) -> Source | None:
    if name not in table:
        entry = catalog_for_flag(name)
        if entry is not None:
            raise missing_plugin_error(f"--{name}", entry)
        raise unavailable_error(f"--{name}", flag=name) or ConfigError(
            f"unknown acceleration flag --{name}"
        )
    flag = table[name][0]
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    keys = flag.to_config(items)
    if keys is None:  # a bare on/off flag turned off
        return None
    return Source(f"--{name}", {flag.path: keys}, coerce=True, overrides=overrides)


def merge_sources(
    sources: Sequence[Source], available: Mapping[str, PluginInfo]
) -> dict[str, dict[str, Any]]:
    """``{config path: {key: typed value}}`` from every source, checked and merged.

    Unknown keys and badly typed values are reported with the source that gave them (every
    source's problems together). The one rule of merging, as for the run's other options:
    what the command line gives overrides the same key from any file (the run config's
    ``plugins:``, an acceleration config); two files, or two flags, that give one key
    different (typed) values are an error naming both. A section whose schema says it
    switches nothing on is an error (see :func:`check_enables_something`).
    """
    owners = path_owners(available)
    merged: dict[str, dict[str, Any]] = {}
    given_by: dict[str, dict[str, Source]] = {}
    path_origins: dict[str, list[str]] = {}
    problems = Problems()
    for source in sorted(sources, key=lambda s: s.overrides):  # files first (a stable sort)
        for path, sub in source.sections.items():
            typed = problems.check(_typed, source, path, sub, owners)
            if typed is None:
                continue
            current = merged.setdefault(path, {})
            origins = given_by.setdefault(path, {})
            path_origins.setdefault(path, []).append(source.origin)
            for key, value in typed.items():
                earlier = origins.get(key)
                if earlier is not None and not _same(current[key], value):
                    if source.overrides and not earlier.overrides:
                        current[key], origins[key] = value, source  # the command line wins
                        continue
                    problems.errors.append(
                        ConfigError(
                            f"plugins.{path}.{key} is {current[key]!r} from {earlier.origin} but "
                            f"{value!r} from {source.origin}; give one value"
                        )
                    )
                    continue
                current[key] = value
                origins.setdefault(key, source)
    problems.raise_any()
    for path, values in merged.items():
        schema = owners[path].cls.schema_for(path)
        if schema is not None:
            problems.check(check_enables_something, schema, values, path, path_origins[path])
    problems.raise_any()
    return merged


def _typed(source: Source, path: str, sub: Any, owners: Mapping[str, PluginInfo]) -> dict:
    where = f"plugins.{path}"
    if path not in owners:
        entry = catalog_for_path(path)
        if entry is None:
            raise unavailable_error(f"config path '{where}'", path=path) or ConfigError(
                f"{source.origin}: unknown config path '{where}'"
            )
        raise missing_plugin_error(f"config path '{where}'", entry)
    if sub is None:
        sub = {}
    if not isinstance(sub, Mapping):
        raise ConfigError(f"{source.origin}: {where}: expected a mapping of options, got {sub!r}")
    schema = owners[path].cls.schema_for(path)
    if schema is None:
        if sub:
            raise ConfigError(f"{source.origin}: {where}: takes no options, got {sorted(sub)}")
        return {}
    try:
        return convert_fields(schema, sub, where, coerce=source.coerce)
    except ConfigError as err:
        raise ConfigError(f"{source.origin}: {err}") from None


def _same(a: Any, b: Any) -> bool:
    """Equal and of one type (``1`` and ``True`` are different settings)."""
    return type(a) is type(b) and a == b


def check_enables_something(
    schema: type, values: Mapping[str, Any], path: str, origins: Sequence[str]
) -> None:
    """Refuse a section that switches nothing on.

    A schema may define ``enables_nothing(self) -> bool``; when it answers True for the
    section the user wrote (``--fast_kernels False False False``), activating the plugin
    would train exactly as without it while the start-of-training block lists it as active,
    so this is an error rather than a warning. Schemas without the method are not checked:
    for them the section's presence is the setting (``padding_free: {}``).
    """
    config = build_config(schema, values, f"plugins.{path}")
    check = getattr(config, "enables_nothing", None)
    if callable(check) and check():
        raise ConfigError(
            f"plugins.{path} (from {' and '.join(dict.fromkeys(origins))}) switches nothing on: "
            "every option is off; turn one on or leave the section out"
        )

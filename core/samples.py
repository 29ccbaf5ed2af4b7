"""The sample acceleration configs shipped with accel, and resolving a name or a path to a file.

The samples are package data of ``accel.configs`` (the repository's ``configs/`` folder), so
they are found the same way from a wheel and from an editable install. ``accel configs``
lists them; ``--acceleration_config`` and ``accel arguments`` take a sample's name or a path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ConfigError, did_you_mean


def sample_dir() -> Path:
    return Path(str(resources.files("accel.configs")))


def samples() -> dict[str, Path]:
    """``{name: file}`` of every sample config, by file name without ``.yaml``."""
    return {p.stem: p for p in sorted(sample_dir().glob("*.yaml"))}


def description(path: Path) -> str:
    """A sample's first comment line, which says what it switches on."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config_file(value: str | Path) -> Path:
    """The config file ``value`` names: an existing file first, else a sample's name.

    A file of that name wins over a sample so that a user's own file is never shadowed by a
    sample added later; a directory or a name that is neither is an error that lists the
    samples.
    """
    path = Path(value)
    if path.is_file():
        return path
    found = samples()
    if isinstance(value, str) and value in found:
        return found[value]
    if path.is_dir():
        raise ConfigError(
            f"acceleration config '{value}' is a directory; give a YAML file or a sample name "
            f"({', '.join(found)})"
        )
    listing = f"Samples (`accel configs`): {', '.join(found)}"
    if isinstance(value, Path) or "/" in value or path.suffix in (".yaml", ".yml", ".json"):
        raise ConfigError(f"acceleration config file '{value}' does not exist. {listing}")
    raise ConfigError(
        f"acceleration config '{value}' is neither a file nor a sample name."
        f"{did_you_mean(str(value), found)} {listing}"
    )

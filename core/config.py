"""Reading acceleration configs: YAML files or mappings with a ``plugins:`` root.

The layout is fms-acceleration's: nested keys under ``plugins:`` spell a path such as
``training.fused_ops_and_kernels``; the mapping found at an activation path is that
plugin's config. Any key that is not on the way to a known path is rejected with the
valid keys at that level.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, did_you_mean

ROOT = "plugins"


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file with an error that names the file and line."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None


def load_acceleration_config(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Return the mapping under ``plugins:`` and where it came from (for messages).

    ``source`` is a YAML file, the name of a sample config (``accel configs``), or a mapping
    with a ``plugins:`` root. An empty file, a missing or bare ``plugins:`` key, and an empty
    mapping are errors rather than "no acceleration": the user passed this config to switch
    something on, and training without any plugin would look like success.
    """
    origin = "acceleration config"
    if isinstance(source, (str, Path)):
        from .samples import resolve_config_file

        path = resolve_config_file(source)
        origin = f"acceleration config '{path}'"
        source = read_yaml(path)
        if source is None:
            raise ConfigError(f"{origin} is empty; {_NEEDS}")
    if not isinstance(source, Mapping):
        raise ConfigError(f"{origin}: expected a mapping with a '{ROOT}:' key, got {source!r}")
    extra = [k for k in source if k != ROOT]
    if extra:
        raise ConfigError(
            f"{origin}: unknown top-level key '{extra[0]}'; an acceleration config has a single "
            f"'{ROOT}:' key.{did_you_mean(str(extra[0]), [ROOT])}"
        )
    tree = source.get(ROOT)
    if not tree:
        what = f"has no '{ROOT}:' key" if ROOT not in source else f"has an empty '{ROOT}:'"
        raise ConfigError(f"{origin} {what}; {_NEEDS}")
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{origin}: '{ROOT}' must be a mapping, got {tree!r}")
    return dict(tree), origin


_NEEDS = (
    f"it must name at least one plugin config path under '{ROOT}:' (`accel plugins` lists "
    "each plugin's paths); `accel configs` lists samples"
)


def collect_sections(tree: Mapping[str, Any], known_paths: Iterable[str]) -> dict[str, Any]:
    """Split the ``plugins:`` tree into ``{activation path: config}``.

    ``known_paths`` are every activation path the framework knows (installed plugins and
    the first-party catalog).
    """
    known = set(known_paths)
    sections: dict[str, Any] = {}
    _walk(tree, "", known, sections)
    return sections


def _walk(node: Mapping[str, Any], prefix: str, known: set[str], out: dict[str, Any]) -> None:
    children = sorted({p[len(prefix) :].split(".")[0] for p in known if p.startswith(prefix)})
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in known:
            out[path] = {} if value is None else value
        elif any(p.startswith(path + ".") for p in known):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{ROOT}.{path}: expected a mapping, got {value!r}")
            _walk(value, path + ".", known, out)
        else:
            where = f"{ROOT}.{prefix}".rstrip(".")
            raise ConfigError(
                f"{where}: unknown key '{key}'.{did_you_mean(str(key), children)} "
                f"Valid keys here: {', '.join(children)}."
            )

"""Plugin discovery (the ``accel.plugins`` entry-point group) and the first-party catalog.

Nothing here is cached at module level: every framework discovers for itself, so tests
and notebooks that install a plugin see it at once and two frameworks never share state.
The catalog only *names* the first-party plugins (their package, folder, config paths and
flags) so that a feature whose plugin is missing gets an exact install command.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import AccelError, ConfigError, PluginConflictError, PluginNotInstalledError
from .flags import Flag
from .plugin import AccelerationPlugin

ENTRY_POINT_GROUP = "accel.plugins"


@dataclass(frozen=True)
class CatalogEntry:
    """A first-party plugin package of this repository."""

    package: str  # plugin folder under plugins/ and the `accel install` name
    distribution: str
    extra: str
    plugins: tuple[str, ...]
    config_paths: tuple[str, ...]
    flags: tuple[str, ...]
    summary: str
    commands: tuple[str, ...] = ()  # `accel` commands its package adds ("plot.odm": `plot odm`)
    folder: str = ""  # its folder in a checkout (default plugins/<package>)

    @property
    def checkout_folder(self) -> str:
        return self.folder or f"plugins/{self.package}"


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "fused_ops",
        "accel-fused-ops",
        "fused_ops",
        ("fused_ops",),
        ("training.fused_ops_and_kernels", "peft.quantization.fused_ops_and_kernels"),
        ("fast_kernels", "fused_lora"),
        "Triton kernels: cross-entropy, fused linear CE, RMSNorm, RoPE, SwiGLU, fused LoRA",
    ),
    CatalogEntry(
        "attention_packing",
        "accel-attention-packing",
        "attention_packing",
        ("padding_free", "multipack"),
        ("training.attention.padding_free", "training.dataloader.multipack"),
        ("padding_free", "multipack"),
        "padding-free training and multipack batching",
    ),
    CatalogEntry(
        "peft",
        "accel-peft",
        "peft",
        ("auto_gptq", "bitsandbytes"),
        ("peft.quantization.auto_gptq", "peft.quantization.bitsandbytes"),
        ("auto_gptq", "bnb_qlora"),
        "GPTQ-LoRA (gptqmodel) and bitsandbytes QLoRA",
        commands=("quantize", "export.merged"),
    ),
    CatalogEntry(
        "moe",
        "accel-moe",
        "moe",
        ("scattermoe",),
        ("training.moe.scattermoe",),
        ("fast_moe",),
        "ScatterMoE kernels, expert parallelism, checkpoint export",
        commands=("moe.export",),
    ),
    CatalogEntry(
        "odm",
        "accel-odm",
        "odm",
        ("odm",),
        ("training.odm.odm",),
        ("odm",),
        "online data mixing",
        commands=("plot.odm",),
    ),
    # not a plugin: the experiment-matrix tool, a package of its own
    CatalogEntry(
        "bench",
        "accel-bench",
        "bench",
        (),
        (),
        (),
        "the fine-tuning experiment matrix (accel bench)",
        commands=("bench", "corpus"),
        folder="bench",
    ),
)


def install_command(entry: CatalogEntry) -> str:
    return f"python -m accel.cli install {entry.package}"


def catalog_for_path(path: str) -> CatalogEntry | None:
    return next((e for e in CATALOG if path in e.config_paths), None)


def catalog_for_flag(flag: str) -> CatalogEntry | None:
    return next((e for e in CATALOG if flag in e.flags), None)


def catalog_for_command(name: str) -> CatalogEntry | None:
    """The first-party package that adds the command ``name`` ("quantize", "plot.odm")."""
    return next((e for e in CATALOG if name in e.commands), None)


def catalog_for_name(name: str) -> CatalogEntry | None:
    """Find a catalog entry by folder name, plugin name or distribution name."""
    norm = name.replace("-", "_").lower()
    for entry in CATALOG:
        names = {entry.package, entry.distribution.replace("-", "_"), *entry.plugins}
        if norm in names:
            return entry
    return None


def missing_plugin_error(what: str, entry: CatalogEntry) -> AccelError:
    from .discovery import unavailable_error

    for path in entry.config_paths:  # installed but broken, or switched off
        if (err := unavailable_error(what, path=path)) is not None:
            return err
    return PluginNotInstalledError(
        f"{what} needs the plugin package '{entry.distribution}' ({entry.summary}), which is not "
        f"installed. Install it with: {install_command(entry)}"
    )


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin class and where it came from."""

    name: str
    cls: type[AccelerationPlugin]
    distribution: str
    version: str
    entry_point: str


def path_owners(available: Mapping[str, PluginInfo]) -> dict[str, PluginInfo]:
    """Which installed plugin each activation path belongs to (a path claimed twice is an error)."""
    owners: dict[str, PluginInfo] = {}
    for info in available.values():
        for path in info.cls.config_paths:
            if path in owners:
                raise PluginConflictError(
                    f"config path '{path}' is claimed by plugins '{owners[path].name}' and "
                    f"'{info.name}'; uninstall one of them"
                )
            owners[path] = info
    return owners


def installed_flags(available: Mapping[str, PluginInfo]) -> dict[str, tuple[Flag, PluginInfo]]:
    """``{flag name: (flag, plugin)}`` of the installed plugins (a name declared twice is an error)."""
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
    """Installed plugins' flags and the catalog's (whose use answers with the install command)."""
    from .discovery import discover

    names = set(installed_flags(available))
    names.update(f for entry in CATALOG for f in entry.flags)
    names.update(f for broken in discover().broken for f in broken.flags)
    return sorted(names)


def known_paths(owners: Mapping[str, PluginInfo]) -> set[str]:
    """Every activation path a config may name: installed plugins' and the catalog's."""
    from .discovery import discover

    broken = {p for b in discover().broken for p in b.config_paths}
    return set(owners) | {p for e in CATALOG for p in e.config_paths} | broken


def discover_plugins() -> dict[str, PluginInfo]:
    """The usable plugin classes registered in the ``accel.plugins`` entry-point group; a
    broken or switched-off one is skipped (see :mod:`accel.discovery`)."""
    from .discovery import discover

    return discover().plugins


def plugin_info(
    cls: type, distribution: str = "?", version: str = "?", entry: str = ""
) -> PluginInfo:
    if not (isinstance(cls, type) and issubclass(cls, AccelerationPlugin)):
        raise AccelError(
            f"entry point '{entry}' of package '{distribution}' does not name a subclass of "
            "accel.AccelerationPlugin"
        )
    if not cls.name or not cls.config_paths:
        raise AccelError(
            f"plugin class {cls.__qualname__} from '{distribution}' must declare `name` and "
            "`config_paths`"
        )
    return PluginInfo(cls.name, cls, distribution, version, entry)


def checkout_root() -> Path | None:
    """The accel repository checkout this core comes from, if it is still there: the folder
    above ``core/`` for an editable install, else the one named in pip's ``direct_url.json``
    (a wheel from an index has none)."""
    import json

    here = Path(__file__).resolve().parent
    candidates = [here.parent] if here.name == "core" else []
    for dist in metadata.distributions(name="accel-core"):
        direct = dist.read_text("direct_url.json")
        url = json.loads(direct).get("url", "") if direct else ""
        if url.startswith("file://"):
            from urllib.request import url2pathname

            candidates.append(Path(url2pathname(url[len("file://") :])))
    for root in candidates:
        if (root / "plugins").is_dir() and (root / "core" / "framework.py").is_file():
            return root
    return None

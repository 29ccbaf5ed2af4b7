"""AccelerationFramework: activate, validate and order plugins, then run their hooks.

One framework holds everything it knows (discovered plugins, active plugin instances,
applied patches) on the instance, so two frameworks in one process never interfere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from .errors import (
    ConfigError,
    PluginConflictError,
    PluginRequirementError,
    UnsupportedModelError,
)
from .patching import AppliedPatches, apply_patches
from .plugin import SINGLE_OWNER_HOOKS, AccelerationPlugin
from .registry import (
    PluginInfo,
    catalog_for_name,
    catalog_for_path,
    discover_plugins,
    install_command,
    missing_plugin_error,
    path_owners,
)
from .schema import build_config
from .sources import Source, gather_sources, merge_sources
from .version import __version__

logger = logging.getLogger("accel")


class AccelerationFramework:
    """Activates the plugins named by an acceleration config and runs their stages.

    ``config`` is a YAML path, a sample name or a mapping with a ``plugins:`` root
    (fms-acceleration layout); ``sections`` adds ``{path: sub-config}`` from command-line
    flags; ``sources`` adds more (see :meth:`from_sources`, which a run uses).
    ``available`` replaces entry-point discovery (tests, embedding).
    """

    @classmethod
    def from_sources(
        cls,
        acceleration_config: str | Path | Mapping[str, Any] | None = None,
        *,
        plugins: Mapping[str, Any] | None = None,
        flags: Mapping[str, Any] | None = None,
        available: Mapping[str, PluginInfo] | None = None,
    ) -> AccelerationFramework:
        """The framework of one run, from every place plugin options come from.

        ``acceleration_config``: a YAML file, sample name or mapping (``plugins:`` root);
        ``plugins``: the run config's ``plugins:`` tree; ``flags``: ``{flag name: values}``.
        They are merged by :func:`accel.sources.merge_sources`: the same key from two of them
        must have the same typed value.
        """
        available = discover_plugins() if available is None else available
        found = gather_sources(
            acceleration_config, plugins=plugins, flags=flags, available=available
        )
        return cls(available=available, sources=found)

    def __init__(
        self,
        config: str | Path | Mapping[str, Any] | None = None,
        *,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        available: Mapping[str, PluginInfo] | None = None,
        sources: Sequence[Source] = (),
    ) -> None:
        self.available = dict(discover_plugins() if available is None else available)
        self.trace = os.environ.get("ACCEL_TRACE", "0") == "1"
        owners = path_owners(self.available)
        given = gather_sources(config, sections=sections, available=self.available)
        merged = merge_sources([*given, *sources], self.available)
        self.plugins = self._activate(merged, owners)
        self.patches: AppliedPatches | None = None

    # ------------------------------------------------------------ activation
    def _activate(
        self, sections: Mapping[str, dict[str, Any]], owners: Mapping[str, PluginInfo]
    ) -> list[AccelerationPlugin]:
        by_plugin: dict[str, dict[str, Any]] = {}
        for path, sub in sections.items():
            if path not in owners:
                entry = catalog_for_path(path)
                assert entry is not None  # collect_sections only returns known paths
                raise missing_plugin_error(f"config path 'plugins.{path}'", entry)
            info = owners[path]
            schema = info.cls.schema_for(path)
            if schema is None:
                if sub:
                    raise ConfigError(f"plugins.{path}: takes no options, got {sorted(sub)}")
                value: Any = None
            else:
                value = build_config(schema, sub, f"plugins.{path}", coerce=True)
            by_plugin.setdefault(info.name, {})[path] = value
        infos = {name: self.available[name] for name in by_plugin}
        for info in infos.values():
            _check_core_version(info)
            _check_packages(info)
        _check_requires(infos, self.available)
        _check_conflicts(infos)
        ordered = _order(infos)
        plugins = []
        for name in ordered:
            try:
                plugins.append(infos[name].cls(by_plugin[name]))
            except ValueError as err:  # a plugin rejecting its combined configs
                raise ConfigError(f"plugin '{name}': {err}") from None
        _check_single_owners(plugins)
        return plugins

    # ------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def get(self, name: str) -> AccelerationPlugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def info(self, plugin: AccelerationPlugin) -> PluginInfo:
        return self.available[plugin.name]

    def owner(self, hook: str) -> AccelerationPlugin | None:
        return next((p for p in self.plugins if p.implements(hook)), None)

    def implementing(self, hook: str) -> list[AccelerationPlugin]:
        return [p for p in self.plugins if p.implements(hook)]

    # -------------------------------------------------------------- stages
    def check_model(self, model_config: Any) -> None:
        """Refuse a model architecture an active plugin does not support."""
        model_type = getattr(model_config, "model_type", None)
        for plugin in self.plugins:
            supported = plugin.model_types
            if supported is not None and model_type not in supported:
                raise UnsupportedModelError(
                    f"plugin '{plugin.name}' does not support model_type '{model_type}' "
                    f"({type(model_config).__name__}); supported: {', '.join(supported)}"
                )

    def load_model(
        self, model_name_or_path: str, default: Callable[..., Any], **kwargs: Any
    ) -> Any:
        owner = self.owner("load_model")
        if owner is None:
            return default(model_name_or_path, **kwargs)
        return self._call(owner, "load_model", model_name_or_path, **kwargs)

    def augment_model(self, model: Any, train_args: Any, peft_config: Any) -> tuple[Any, Any]:
        for plugin in self.implementing("augment_model"):
            model, peft_config = self._call(plugin, "augment_model", model, train_args, peft_config)
        return model, peft_config

    def apply_patches(self, model: Any) -> AppliedPatches:
        """Apply every active plugin's patch rules (after adapters are in place)."""
        applied = AppliedPatches(type(model).__name__, getattr(model.config, "model_type", None))
        for plugin in self.implementing("patch_rules"):
            rules = [
                dataclasses.replace(r, name=f"{plugin.name}.{r.name}")
                for r in self._call(plugin, "patch_rules", model)
            ]
            applied.merge(apply_patches(model, rules))
        self.patches = applied
        return applied

    def revert_patches(self) -> None:
        if self.patches is not None:
            self.patches.revert()
            self.patches = None

    def prepare_dataset(self, dataset: Any, tokenizer: Any, train_args: Any) -> Any:
        for plugin in self.implementing("prepare_dataset"):
            dataset = self._call(plugin, "prepare_dataset", dataset, tokenizer, train_args)
        return dataset

    def data_collator(self, tokenizer: Any, train_args: Any, default: Any) -> Any:
        owner = self.owner("data_collator")
        return (
            default
            if owner is None
            else self._call(owner, "data_collator", tokenizer, train_args, default)
        )

    def train_sampler(self, dataset: Any, train_args: Any) -> Any | None:
        owner = self.owner("train_sampler")
        return None if owner is None else self._call(owner, "train_sampler", dataset, train_args)

    def train_dataloader(self, dataset: Any, collator: Any, train_args: Any) -> Any | None:
        owner = self.owner("train_dataloader")
        if owner is None:
            return None
        return self._call(owner, "train_dataloader", dataset, collator, train_args)

    def callbacks(self, model: Any, accelerator: Any) -> list[Any]:
        return [
            cb
            for p in self.implementing("callbacks")
            for cb in self._call(p, "callbacks", model, accelerator)
        ]

    def on_save(self, checkpoint_dir: str, model: Any) -> None:
        for plugin in self.implementing("on_save"):
            self._call(plugin, "on_save", checkpoint_dir, model)

    def export(self, model: Any, output_dir: str) -> None:
        for plugin in self.implementing("export"):
            self._call(plugin, "export", model, output_dir)

    # ------------------------------------------------------------- logging
    def report(self) -> str:
        """The start-of-training block: active plugins, packages, versions, patch report."""
        lines = [f"accel {__version__}: {len(self.plugins)} active plugin(s)"]
        for plugin in self.plugins:
            info = self.info(plugin)
            lines.append(f"  - {plugin.name} ({info.distribution} {info.version})")
            for path, cfg in plugin.configs.items():
                lines.append(f"      plugins.{path}: {_short(cfg)}")
            if plugin.implements("report_lines"):
                lines.extend(f"      {line}" for line in plugin.report_lines())
        if self.patches is not None and self.patches.counts:
            lines.append("  patches (rule -> modules patched):")
            lines.extend(f"    {line}" for line in self.patches.lines())
        return "\n".join(lines)

    def _call(self, plugin: AccelerationPlugin, hook: str, *args: Any, **kwargs: Any) -> Any:
        if not self.trace:
            return getattr(plugin, hook)(*args, **kwargs)
        start = time.perf_counter()
        result = getattr(plugin, hook)(*args, **kwargs)
        logger.info("accel trace: %s.%s took %.3fs", plugin.name, hook, time.perf_counter() - start)
        return result


def _short(cfg: Any) -> str:
    if dataclasses.is_dataclass(cfg):
        return ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))
    return repr(cfg)


def _check_core_version(info: PluginInfo) -> None:
    spec = SpecifierSet(info.cls.core_versions)
    if not spec.contains(__version__, prereleases=True):
        raise PluginRequirementError(
            f"plugin '{info.name}' ({info.distribution} {info.version}) works with accel "
            f"{spec}, but this is accel {__version__}; install a matching version of "
            f"'{info.distribution}' or of accel"
        )


def _check_packages(info: PluginInfo) -> None:
    for text in info.cls.required_packages:
        try:
            req = Requirement(text)
        except InvalidRequirement as err:
            raise PluginRequirementError(
                f"plugin '{info.name}' declares an invalid requirement {text!r}: {err}"
            ) from None
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            raise PluginRequirementError(
                f"plugin '{info.name}' needs the package '{req}', which is not installed; "
                f"install it with: pip install '{req}'"
            ) from None
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            raise PluginRequirementError(
                f"plugin '{info.name}' needs '{req}', but {req.name} {version} is installed; "
                f"install it with: pip install '{req}'"
            )


def _activation_hint(info: PluginInfo) -> str:
    flags = ", ".join(f"--{f.name}" for f in info.cls.flags)
    paths = ", ".join(f"plugins.{p}" for p in info.cls.config_paths)
    return f"add {paths} to the config" + (f" or pass {flags}" if flags else "")


def _check_requires(infos: Mapping[str, PluginInfo], available: Mapping[str, PluginInfo]) -> None:
    for info in infos.values():
        for needed in info.cls.requires:
            if needed in infos:
                continue
            if needed in available:
                raise PluginRequirementError(
                    f"plugin '{info.name}' requires plugin '{needed}', which is not active: "
                    f"{_activation_hint(available[needed])}"
                )
            entry = catalog_for_name(needed)
            fix = (
                f"install it with: {install_command(entry)}"
                if entry
                else "install the package that provides it"
            )
            raise PluginRequirementError(
                f"plugin '{info.name}' requires plugin '{needed}', which is not installed; {fix}"
            )


def _check_conflicts(infos: Mapping[str, PluginInfo]) -> None:
    for info in infos.values():
        for other in info.cls.conflicts:
            if other in infos:
                raise PluginConflictError(
                    f"plugins '{info.name}' and '{other}' cannot be active together; "
                    "remove one of them from the config or flags"
                )


def _order(infos: Mapping[str, PluginInfo]) -> list[str]:
    """Topological order from requires/after/before; ties broken by name for determinism."""
    edges: dict[str, set[str]] = {name: set() for name in infos}  # name -> must run before
    for name, info in infos.items():
        for earlier in (*info.cls.requires, *info.cls.after):
            if earlier in infos:
                edges[earlier].add(name)
        for later in info.cls.before:
            if later in infos:
                edges[name].add(later)
    indegree = {name: 0 for name in infos}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = sorted(n for n, d in indegree.items() if d == 0)
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for t in sorted(edges[name]):
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
                ready.sort()
    if len(order) != len(infos):
        cycle = sorted(set(infos) - set(order))
        raise PluginConflictError(
            f"plugins {', '.join(cycle)} have ordering constraints (requires/after/before) "
            "that form a cycle"
        )
    return order


def _check_single_owners(plugins: list[AccelerationPlugin]) -> None:
    for hook in SINGLE_OWNER_HOOKS:
        owners = [p.name for p in plugins if p.implements(hook)]
        if len(owners) > 1:
            raise PluginConflictError(
                f"plugins {' and '.join(repr(o) for o in owners)} both implement '{hook}', which "
                "only one active plugin may own; activate only one of them"
            )
    loaders = [
        p.name for p in plugins if p.implements("train_sampler") or p.implements("train_dataloader")
    ]
    if len(loaders) > 1:
        raise PluginConflictError(
            f"plugins {' and '.join(repr(o) for o in loaders)} both build the training loader "
            "(train_sampler / train_dataloader); activate only one of them"
        )

"""AccelerationFramework: activate, validate and order plugins, then run their hooks.

One framework holds everything it knows (discovered plugins, active plugin instances,
applied patches) on the instance, so two frameworks in one process never interfere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from .errors import (
    AccelError,
    ConfigError,
    PluginConflictError,
    PluginRequirementError,
    Problems,
    UnsupportedModelError,
)
from .helpers import add_note
from .hookspecs import SPECS, Combine, HookSpec
from .patching import AppliedPatches, apply_patches
from .plugin import AccelerationPlugin, BaseLayer
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
        command_line: Collection[str] = (),
    ) -> AccelerationFramework:
        """The framework of one run, from every place plugin options come from.

        ``acceleration_config``: a YAML file, sample name or mapping (``plugins:`` root);
        ``plugins``: the run config's ``plugins:`` tree; ``flags``: ``{flag name: values}``,
        of which those named in ``command_line`` were typed on the command line. They are
        merged by :func:`accel.sources.merge_sources`: the command line overrides the files;
        otherwise the same key from two of them must have the same typed value.
        """
        available = discover_plugins() if available is None else available
        problems = Problems()  # a bad flag's problem, and those of the other sources too
        found = gather_sources(
            acceleration_config,
            plugins=plugins,
            flags=flags,
            available=available,
            command_line=command_line,
            problems=problems,
        )
        framework = problems.check(cls, available=available, sources=found)
        problems.raise_any()
        return framework

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

    def implementing(self, hook: str) -> list[AccelerationPlugin]:
        """The active plugins that implement ``hook``, in the resolved order."""
        return [p for p in self.plugins if p.implements(hook)]

    # ------------------------------------------------------------ dispatch
    def call(self, hook: str, /, fallback: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Call ``hook`` on the active plugins, combined as its spec says (:mod:`accel.hookspecs`).

        Every hook call goes through here, with the spec's parameters by keyword. Single
        owner: the owner's result, or ``fallback()`` (``None`` without one) when no plugin
        owns the hook or the owner returned ``None``. Chained: the threaded value after the
        last plugin (a tuple when the spec threads several). Fan-out: the joined lists for
        hooks that return lists, else ``None``.
        """
        spec = _spec(hook, kwargs)
        if spec.combine is Combine.SINGLE:
            owners = self.implementing(hook)
            result = self._invoke(owners[0], spec, kwargs) if owners else None
            if result is None and fallback is not None:
                return fallback()
            return result
        if fallback is not None:
            raise TypeError(f"hook '{hook}' is {spec.combine.value}; it takes no fallback")
        if spec.combine is Combine.CHAINED:
            values = dict(kwargs)
            for plugin in self.implementing(hook):
                values.update(_threaded(plugin, spec, self._invoke(plugin, spec, values)))
            threaded = tuple(values[name] for name in spec.threads)
            return threaded[0] if len(threaded) == 1 else threaded
        results = self.call_each(hook, **kwargs)
        return [item for _, items in results for item in items] if spec.joins else None

    def call_each(self, hook: str, /, **kwargs: Any) -> list[tuple[AccelerationPlugin, Any]]:
        """A fan-out hook's result per implementing plugin, in order (lists for joining hooks)."""
        spec = _spec(hook, kwargs)
        if spec.combine is not Combine.FANOUT:
            raise TypeError(f"hook '{hook}' is {spec.combine.value}; use call()")
        results = []
        for plugin in self.implementing(hook):
            result = self._invoke(plugin, spec, kwargs)
            results.append((plugin, _joinable(plugin, spec, result) if spec.joins else result))
        return results

    def _invoke(self, plugin: AccelerationPlugin, spec: HookSpec, kwargs: Mapping[str, Any]) -> Any:
        """One plugin's implementation: traced, and its errors name the plugin and the hook.

        An :class:`AccelError` (a user-facing error: bad input or environment) gets the
        plugin and hook in its message, so the CLI prints it as one line; any other exception
        is a bug and keeps its traceback, with a note naming the plugin and the hook.
        """
        keywords = type(plugin)._accel_hooks[spec.name]
        passed = kwargs if keywords is None else {k: kwargs[k] for k in keywords}
        start = time.perf_counter()
        outcome = "raised"
        try:
            result = getattr(plugin, spec.name)(**passed)
            outcome = "took"
            return result
        except AccelError as err:
            err.args = (f"plugin '{plugin.name}' ({spec.name}): {err}",)
            raise
        except Exception as err:
            add_note(err, f"accel: raised by plugin '{plugin.name}' in hook '{spec.name}'")
            raise
        finally:
            if self.trace:
                elapsed = time.perf_counter() - start
                logger.info("accel trace: %s.%s %s %.3fs", plugin.name, spec.name, outcome, elapsed)

    # -------------------------------------------------------------- stages
    def check_model(self, model_config: Any, model_name: str = "the model") -> None:
        """Refuse a model architecture an active plugin does not support, and a quantized
        checkpoint that no active plugin trains (read from the plugins' ``quant_methods``)."""
        model_type = getattr(model_config, "model_type", None)
        for plugin in self.plugins:
            supported = plugin.model_types
            if supported is not None and model_type not in supported:
                reason = plugin.unsupported_reasons.get(model_type)
                why = f": {reason}" if reason else ""
                raise UnsupportedModelError(
                    f"plugin '{plugin.name}' does not support model_type '{model_type}' "
                    f"({type(model_config).__name__}){why}; supported: {', '.join(supported)}"
                )
        method = _quant_method(model_config)
        if method is None or any(method in p.quant_methods for p in self.plugins):
            return
        trainers = [i for i in self.available.values() if method in i.cls.quant_methods]
        if trainers:
            cls = trainers[0].cls
            raise ConfigError(
                f"model '{model_name}' is a {method.upper()} checkpoint (quant_method "
                f"'{method}' in its config.json); plugin '{cls.name}' trains on it: pass "
                f"{cls.usage_text()}"
            )

    def base_layer(self) -> BaseLayer | None:
        """The layers an active plugin loads the base with (its ``base_layer``), if any."""
        for plugin in self.plugins:
            if plugin.base_layer:
                return BaseLayer(plugin.base_layer, plugin.name, plugin.usage_text())
        return None

    def check_run(self, run_config: Any, model_config: Any) -> None:
        """Every active plugin's checks of the run, before the model loads."""
        self.call(
            "check_run",
            run_config=run_config,
            model_config=model_config,
            base_layer=self.base_layer(),
        )

    @property
    def applies_label_smoothing(self) -> bool:
        """Whether an active plugin's loss applies ``--label_smoothing_factor`` itself."""
        return any(p.applies_label_smoothing for p in self.plugins)

    def data_mixer(self) -> AccelerationPlugin | None:
        """The active plugin that mixes the datasets of a data config, if any."""
        return next((p for p in self.plugins if p.data_mixer), None)

    def trained_examples(self) -> Mapping[str, int] | None:
        return self.call("trained_examples")

    # The named entry points of a run; each is one dispatch (the rules live in ``call``).
    def load_model(
        self, model_name_or_path: str, default: Callable[..., Any], **kwargs: Any
    ) -> Any:
        """The model from the plugin that owns loading, else ``default(name, **kwargs)``."""
        return self.call(
            "load_model",
            model_name_or_path=model_name_or_path,
            model_kwargs=dict(kwargs),
            fallback=lambda: default(model_name_or_path, **kwargs),
        )

    def augment_model(self, model: Any, train_args: Any, peft_config: Any) -> tuple[Any, Any]:
        return self.call(
            "augment_model", model=model, train_args=train_args, peft_config=peft_config
        )

    def apply_patches(self, model: Any) -> AppliedPatches:
        """Apply every active plugin's patch rules (after adapters are in place).

        One transaction: all plugins' rules are collected first (named ``plugin.rule``), then
        applied together; any failure leaves the model unpatched.
        """
        rules = [
            dataclasses.replace(rule, name=f"{plugin.name}.{rule.name}")
            for plugin, plugin_rules in self.call_each("patch_rules", model=model)
            for rule in plugin_rules
        ]
        self.patches = apply_patches(model, rules)
        return self.patches

    def revert_patches(self) -> None:
        if self.patches is not None:
            self.patches.revert()
            self.patches = None

    def prepare_dataset(self, dataset: Any, tokenizer: Any, train_args: Any) -> Any:
        return self.call(
            "prepare_dataset", dataset=dataset, tokenizer=tokenizer, train_args=train_args
        )

    def data_collator(self, tokenizer: Any, train_args: Any, default: Any) -> Any:
        return self.call(
            "data_collator",
            tokenizer=tokenizer,
            train_args=train_args,
            default=default,
            fallback=lambda: default,
        )

    def train_sampler(self, dataset: Any, train_args: Any) -> Any | None:
        return self.call("train_sampler", dataset=dataset, train_args=train_args)

    def train_dataloader(self, dataset: Any, collator: Any, train_args: Any) -> Any | None:
        return self.call(
            "train_dataloader", dataset=dataset, collator=collator, train_args=train_args
        )

    def callbacks(self, model: Any, accelerator: Any) -> list[Any]:
        return self.call("callbacks", model=model, accelerator=accelerator)

    def on_save(self, checkpoint_dir: str, model: Any) -> None:
        self.call("on_save", checkpoint_dir=checkpoint_dir, model=model)

    def export(self, model: Any, output_dir: str) -> None:
        self.call("export", model=model, output_dir=output_dir)

    # ------------------------------------------------------------- logging
    def report(self) -> str:
        """The start-of-training block: active plugins, packages, versions, patch report."""
        extra = {plugin.name: lines for plugin, lines in self.call_each("report_lines")}
        lines = [f"accel {__version__}: {len(self.plugins)} active plugin(s)"]
        for plugin in self.plugins:
            info = self.info(plugin)
            lines.append(f"  - {plugin.name} ({info.distribution} {info.version})")
            for path, cfg in plugin.configs.items():
                lines.append(f"      plugins.{path}: {_short(cfg)}")
            lines.extend(f"      {line}" for line in extra.get(plugin.name, ()))
        if self.patches is not None and self.patches.counts:
            lines.append("  patches (rule -> modules patched):")
            lines.extend(f"    {line}" for line in self.patches.lines())
        return "\n".join(lines)


def _spec(hook: str, kwargs: Mapping[str, Any]) -> HookSpec:
    """The spec of ``hook``; the core must pass exactly its parameters."""
    spec = SPECS.get(hook)
    if spec is None:
        raise TypeError(f"no hook named '{hook}'; hooks: {', '.join(SPECS)}")
    if set(kwargs) != set(spec.params):
        raise TypeError(f"hook '{hook}' takes {', '.join(spec.params)}; got {', '.join(kwargs)}")
    return spec


def _threaded(plugin: AccelerationPlugin, spec: HookSpec, result: Any) -> dict[str, Any]:
    """What a chained hook returned, as the values it threads on to the next plugin."""
    expected = ", ".join(spec.threads)
    if len(spec.threads) == 1:
        if result is None:
            raise TypeError(
                f"plugin '{plugin.name}': hook '{spec.name}' returned None; "
                f"return the (possibly new) {expected}"
            )
        return {spec.threads[0]: result}
    if not isinstance(result, tuple) or len(result) != len(spec.threads):
        raise TypeError(
            f"plugin '{plugin.name}': hook '{spec.name}' must return the tuple ({expected}), "
            f"got {type(result).__name__}"
        )
    return dict(zip(spec.threads, result))


def _joinable(plugin: AccelerationPlugin, spec: HookSpec, result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
        raise TypeError(
            f"plugin '{plugin.name}': hook '{spec.name}' must return a list, "
            f"got {type(result).__name__}"
        )
    return list(result)


def _short(cfg: Any) -> str:
    """A section's settings that differ from the schema's defaults (two paths of one plugin
    may share a schema: listing every field would show each path switching the other's
    features off)."""
    if not dataclasses.is_dataclass(cfg):
        return repr(cfg)
    changed = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            changed.append(f"{f.name}={value!r}")
            continue
        if value != default or type(value) is not type(default):
            changed.append(f"{f.name}={value!r}")
    return ", ".join(changed) or "(every option at its default)"


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
    """At most one owner per single-owner hook, and per group of them (the training loader)."""
    groups: dict[str, list[str]] = {}
    for spec in SPECS.values():
        if spec.combine is not Combine.SINGLE:
            continue
        owners = [p.name for p in plugins if p.implements(spec.name)]
        if len(owners) > 1:
            raise PluginConflictError(
                f"plugins {' and '.join(repr(o) for o in owners)} both implement "
                f"'{spec.name}', which only one active plugin may own; activate only one of them"
            )
        if spec.group:
            members = groups.setdefault(spec.group, [])
            members.extend(o for o in owners if o not in members)
    for group, owners in groups.items():
        if len(owners) > 1:
            hooks = " / ".join(s.name for s in SPECS.values() if s.group == group)
            raise PluginConflictError(
                f"plugins {' and '.join(repr(o) for o in owners)} both build the {group} "
                f"({hooks}); activate only one of them"
            )


def _quant_method(model_config: Any) -> str | None:
    """The ``quant_method`` of a checkpoint's ``quantization_config``, if it has one."""
    qconfig = getattr(model_config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict()
    return (qconfig or {}).get("quant_method")

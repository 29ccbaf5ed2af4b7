"""The plugin contract: what a plugin declares as data and how it implements hooks.

A plugin is a subclass of :class:`AccelerationPlugin` published in the ``accel.plugins``
entry-point group. The framework instantiates it with its validated configs (one per
activation path present in the user's config) and calls the methods it marks with
:func:`accel.hook`, in the resolved plugin order. The hooks, their parameters and how their
results combine are specified in :mod:`accel.hookspecs`; a class whose hooks do not fit is
refused when it is defined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .flags import Flag
from .hookspecs import check_attribute, hook

__all__ = ["AccelerationPlugin", "BaseLayer", "Flag", "hook"]


@dataclass(frozen=True)
class BaseLayer:
    """The layers an active plugin loads the base with, as the ``check_run`` hook sees them."""

    #: the plugin's :attr:`AccelerationPlugin.base_layer`
    kind: str
    #: the plugin that loads them
    plugin: str
    #: how that plugin is activated (its :attr:`AccelerationPlugin.usage`)
    usage: str


class AccelerationPlugin:
    """Base class of every accel plugin.

    Declare the class attributes below and implement the hooks you need as methods marked
    with ``@hook`` (see :mod:`accel.hookspecs`). ``self.configs`` maps each activation path
    the user set to its validated config object.
    """

    #: unique plugin name (``accel plugins`` lists it; other plugins refer to it)
    name: ClassVar[str] = ""
    #: config paths under ``plugins:`` that activate the plugin, e.g. ``training.odm.odm``
    config_paths: ClassVar[tuple[str, ...]] = ()
    #: a dataclass for every path, or one mapping ``path -> dataclass``; ``None`` = no keys
    config_schema: ClassVar[type | Mapping[str, type] | None] = None
    #: command-line flags that fill the config
    flags: ClassVar[tuple[Flag, ...]] = ()
    #: plugins that must be active too (they run before this one)
    requires: ClassVar[tuple[str, ...]] = ()
    #: plugins that cannot be active at the same time
    conflicts: ClassVar[tuple[str, ...]] = ()
    #: ordering constraints: run after / before these plugins when they are active
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    #: ``config.model_type`` values supported; ``None`` means any architecture
    model_types: ClassVar[tuple[str, ...] | None] = None
    #: ``config.model_type`` -> why it is refused, for known architectures outside
    #: ``model_types`` (the refusal shows it)
    unsupported_reasons: ClassVar[Mapping[str, str]] = {}
    #: requirement strings checked at activation, e.g. ``"bitsandbytes>=0.45"``
    required_packages: ClassVar[tuple[str, ...]] = ()
    #: the core versions this plugin works with (a PEP 440 specifier)
    core_versions: ClassVar[str] = ">=0.1,<0.2"

    # Capabilities: what the plugin provides, read by the core without knowing the plugin.
    #: how a user activates the plugin, quoted in errors of the core and other plugins
    #: (e.g. ``"--my_flag value"``); default: its first flag, else its config paths
    usage: ClassVar[str] = ""
    #: the kind of layers the plugin loads the base model with (e.g. a 4-bit linear kind;
    #: ``""``: the plain layers); other plugins see it in ``check_run``'s ``base_layer``
    base_layer: ClassVar[str] = ""
    #: ``quant_method`` values (a checkpoint's ``quantization_config``) this plugin trains;
    #: a run on such a checkpoint without an active plugin that declares it is refused
    quant_methods: ClassVar[tuple[str, ...]] = ()
    #: the ``dataprocessor.type`` of a data config this plugin mixes (it owns the training
    #: loader); ``dataprocessor.<type>`` holds its options, read as ``DataMix.options``
    data_mixer: ClassVar[str] = ""

    #: set by the plugin (in ``check_run``) when its own loss applies
    #: ``--label_smoothing_factor``: the trainer then builds no label smoother of its own
    applies_label_smoothing: bool = False

    #: hook name -> the spec keywords its implementation takes (``None``: all); set per class
    _accel_hooks: ClassVar[dict[str, frozenset[str] | None]] = {}

    def __init__(self, configs: Mapping[str, Any]):
        self.configs = dict(configs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the class against the hook contract when it is defined, not at run time."""
        super().__init_subclass__(**kwargs)
        hooks: dict[str, frozenset[str] | None] = {}
        for base in reversed(cls.__mro__[1:]):
            hooks.update(vars(base).get("_accel_hooks", {}))
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            is_hook, keywords = check_attribute(cls.__qualname__, attr, value)
            if is_hook:
                hooks[attr] = keywords
        cls._accel_hooks = hooks

    def config(self, path: str | None = None) -> Any:
        """The validated config at ``path`` (default: the only / first active path)."""
        if path is None:
            return next(iter(self.configs.values()))
        return self.configs.get(path)

    @classmethod
    def implements(cls, hook: str) -> bool:
        """Whether this plugin implements ``hook`` (a method marked with ``@hook``)."""
        return hook in cls._accel_hooks

    @classmethod
    def usage_text(cls) -> str:
        """:attr:`usage`, else the first flag, else the config paths that activate the plugin."""
        if cls.usage:
            return cls.usage
        if cls.flags:
            return f"--{cls.flags[0].name}"
        return ", ".join(f"plugins.{path}" for path in cls.config_paths)

    @classmethod
    def schema_for(cls, path: str) -> type | None:
        schema = cls.config_schema
        if isinstance(schema, Mapping):
            return schema.get(path)
        return schema

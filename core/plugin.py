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
from typing import Any, ClassVar

from .flags import Flag
from .hookspecs import check_attribute, hook

__all__ = ["AccelerationPlugin", "Flag", "hook"]


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
    def schema_for(cls, path: str) -> type | None:
        schema = cls.config_schema
        if isinstance(schema, Mapping):
            return schema.get(path)
        return schema

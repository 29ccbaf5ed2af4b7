"""Command-line flags that switch plugins on (fms-hf-tuning's names).

A plugin declares its flags as :class:`Flag` objects. Every flag fills one config path, so
flags of one plugin compose: ``--fast_kernels`` and ``--fused_lora`` fill two different paths
of ``fused_ops``. A flag only maps its positional values to keys: the values keep the types
they arrived with (strings from the command line, booleans and numbers from JSON or
``accel.train``) and the plugin's schema converts them once (:mod:`accel.sources`).

This module imports nothing but the errors, so :mod:`accel.plugin` can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """A command-line flag that activates a plugin (``--fast_kernels True True True``).

    Positional values fill ``fields`` of the config at ``path`` in order. ``nargs`` lists the
    accepted value counts when trailing fields are optional (``(3, 4)``: the 4th may be left
    out); by default every field takes a value.

    A flag without ``fields`` is an on/off switch: ``--name`` or ``--name true`` (``True``
    from Python) activates ``path`` with the schema's defaults, ``--name false`` leaves it off.
    """

    name: str
    path: str
    help: str
    fields: tuple[str, ...] = ()
    nargs: tuple[int, ...] | None = None

    @property
    def is_switch(self) -> bool:
        return not self.fields and self.nargs is None

    def value_counts(self) -> tuple[int, ...]:
        if self.is_switch:
            return (0, 1)
        return self.nargs if self.nargs is not None else (len(self.fields),)

    def usage(self) -> str:
        """``--name field1 field2 [field3]``, optional trailing fields in brackets."""
        if self.is_switch:
            return f"--{self.name} [true|false]"
        shortest = min(self.value_counts())
        names = [f if i < shortest else f"[{f}]" for i, f in enumerate(self.fields)]
        return " ".join([f"--{self.name}", *names])

    def to_config(self, values: Sequence[Any]) -> dict[str, Any] | None:
        """The keys the values set at ``self.path``, values unchanged (the schema types them);
        ``None`` for a switch turned off."""
        values = list(values)
        counts = self.value_counts()
        if len(values) not in counts:
            expected = " or ".join(str(c) for c in counts)
            raise ConfigError(
                f"--{self.name}: got {len(values)} value(s) {values}, expected {expected}: "
                f"{self.usage()}"
            )
        if self.is_switch and values and not _switch_on(self.name, values[0]):
            return None
        return dict(zip(self.fields, values))

    def to_values(self, config: Any) -> list[str] | None:
        """The command-line values that give the validated ``config`` (a schema instance), or
        ``None`` when an option outside this flag's fields differs from its default."""
        if not dataclasses.is_dataclass(config):
            return None
        for f in dataclasses.fields(config):
            if f.name in self.fields or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                return None
            if getattr(config, f.name) != default:
                return None
        return [_word(getattr(config, name)) for name in self.fields]


def _switch_on(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"--{name}: got {value!r}, expected true or false (or no value): --{name}")


def _word(value: Any) -> str:
    """One value as the command line spells it (the schema reads it back to the same value)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_word(v) for v in value)
    return str(value)

"""Typed validation of plugin configs declared as dataclasses.

A plugin declares its config as a dataclass; :func:`build_config` turns the user's mapping
into an instance, rejecting unknown keys (with the valid keys and the closest match), wrong
types and values outside a ``Literal``. ``coerce=True`` also accepts strings, which is how
values arrive from command-line flags (``--fast_kernels True True True``); without it (YAML,
JSON, Python) a value must already have its type: ``fast_loss: "true"`` is an error.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from .errors import ConfigError, did_you_mean

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def describe_type(tp: Any) -> str:
    """A short human description of a type hint, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, coerce: bool) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, where, coerce)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where}: got {value!r}, expected {describe_type(tp)}")
    if tp is type(None):
        if value is None or (
            coerce and isinstance(value, str) and value.lower() in ("none", "null")
        ):
            return None
        raise ConfigError(f"{where}: got {value!r}, expected null")
    if origin is Literal:
        allowed = typing.get_args(tp)
        for option in allowed:
            if value == option and type(value) is type(option):
                return option
            if coerce and isinstance(value, str) and str(option).lower() == value.lower():
                return option
        hint = did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(
            f"{where}: got {value!r}, expected one of {', '.join(repr(a) for a in allowed)}.{hint}"
        )
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and coerce:
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected {describe_type(tp)}")
        items = [_convert(v, item_type, f"{where}[{i}]", coerce) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if coerce and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if coerce and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if coerce and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build_config(tp, value, where, coerce=coerce)
    raise TypeError(f"{where}: unsupported type hint {tp!r} in a config schema")


def schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema) if f.init}


def convert_fields(
    schema: type, data: Mapping[str, Any] | None, where: str, *, coerce: bool = False
) -> dict[str, Any]:
    """Type-check the keys present in ``data`` against ``schema`` and return them converted.

    Nothing is constructed (no ``__post_init__``, no required keys checked), so one source's
    part of a config can be compared with another's before they are merged.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: got {data!r}, expected a mapping with keys {', '.join(schema_fields(schema))}"
        )
    fields = schema_fields(schema)
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{key}'.{did_you_mean(str(key), fields)} "
                f"Valid keys: {', '.join(fields)}."
            )
    return {name: _field(data[name], hints[name], f"{where}.{name}", coerce) for name in data}


def _field(value: Any, tp: Any, where: str, coerce: bool) -> Any:
    """:func:`_convert`, with a hint when a typed source quoted a value (``"true"``, ``"16"``)."""
    try:
        return _convert(value, tp, where, coerce)
    except ConfigError as err:
        if coerce or not isinstance(value, str):
            raise
        try:
            as_word = _convert(value, tp, where, True)
        except ConfigError:
            raise err from None
        if isinstance(as_word, str):
            raise
        raise ConfigError(f"{err} (write {json.dumps(as_word)} without quotes)") from None


def build_config(
    schema: type, data: Mapping[str, Any] | None, where: str, *, coerce: bool = False
) -> Any:
    """Validate ``data`` against the dataclass ``schema`` and return an instance.

    ``where`` is the config path used in error messages (e.g. ``plugins.training.moe``).
    Values that are already of their field's type pass through unchanged, so building
    from :func:`convert_fields`' output gives the same instance.
    """
    values = convert_fields(schema, data, where, coerce=coerce)
    hints = typing.get_type_hints(schema)
    for name, field in schema_fields(schema).items():
        if (
            name not in values
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(
                f"{where}: missing required key '{name}' ({describe_type(hints[name])})"
            )
    try:
        return schema(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None

"""Validation of free-form option tables against a dataclass of settings."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from .exceptions import ConfigError

__all__ = ["parse_options", "coerce"]

T = TypeVar("T")


def parse_options(config_class: type[T], options: dict[str, Any], where: str) -> T:
    """Build ``config_class`` from ``options``, rejecting unknown keys and wrong types by name."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown} for {where}; valid options: {sorted(fields)}.")
    hints = typing.get_type_hints(config_class)
    values = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in options.items()}
    config = config_class(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for option in arguments:
            if option is type(None) and value is None:
                return None
            try:
                return coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key} = {value!r} matches none of {arguments}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}.")
        item_type = arguments[0] if arguments else Any
        return [coerce(item, item_type, f"{key}[]") for item in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__} {value!r}.")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}.")
    return value

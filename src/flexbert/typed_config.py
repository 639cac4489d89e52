"""Strict construction of dataclass configs from plain mappings (YAML, dotlists, JSON).

Every error names the full key path (``model.blocks.mlp``) so a typo in a 200-line sweep config
is found at start-up, not hours into a run.

Validation happens by construction: a dataclass that defines ``validate(self, path)`` has it called
by :func:`from_dict` as soon as it is built, with the key path where it sits, children before their
parent. A parent never validates a child by hand, so no section can be forgotten.

A dataclass may list keys it no longer takes in a ``RETIRED_KEYS: ClassVar[dict[str, str]]``, each
with the message that says what replaced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from flexbert.errors import FlexBertError

T = TypeVar("T")


class ConfigError(FlexBertError, ValueError):
    """A configuration value is unknown, missing, mistyped or out of range."""

    def __init__(self, key_path: str, message: str):
        self.key_path = key_path
        self.message = message
        super().__init__(f"{key_path}: {message}")

    def __reduce__(self):  # pickled whole, so that one rank can hand the error to the others
        return type(self), (self.key_path, self.message)


def child_path(parent: str, key: object) -> str:
    """``parent.key``, or ``key`` alone at the top level of a file (whose parent path is "")."""
    return f"{parent}.{key}" if parent else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [arg for arg in args if arg is not type(None)]
        if len(alternatives) == 1:  # an optional value or section: its own, precise error
            return _coerce(value, alternatives[0], path)
        sections = [arg for arg in alternatives if dataclasses.is_dataclass(arg)]
        if isinstance(value, Mapping) and len(sections) == 1:  # a number or a section, given a section
            return _coerce(value, sections[0], path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_type, child_path(path, k)) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected a boolean, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by key path
    (``path`` is where ``data`` sits in its file; "" for a whole file)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # A key a recipe may still carry from an earlier version: one line saying what replaced it,
    # where "unknown key" would leave the reader guessing.
    retired = getattr(cls, "RETIRED_KEYS", {})
    for key in data:
        if key in retired and key not in fields:
            raise ConfigError(child_path(path, key), retired[key])
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            child_path(path, unknown[0]), f"unknown key; {hint}valid keys are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], child_path(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(child_path(path, name), "missing required key")
    built = cls(**kwargs)
    validate = getattr(built, "validate", None)
    if callable(validate):
        validate(path)
    return built

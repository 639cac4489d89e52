"""Typed registries: each block family maps names to factories, and configs pick blocks by name.

A registry is generic over its factories' signature, which a ``typing.Protocol`` states. An entry
may take options of its own, declared as a dataclass when it registers: a config then picks it as
``{name: NAME, <option>: ...}`` instead of ``NAME``, and the options are checked against that
dataclass like any other config section.

Users add blocks without editing this package in either of two ways:

* list an importable module under ``plugins:`` in the config; importing it runs its
  ``@REGISTRY.register("name")`` decorators;
* expose a module in the ``flexbert.plugins`` entry-point group of their own package; every such
  module is imported the first time any registry is queried.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

from flexbert.errors import FlexBertError
from flexbert.typed_config import ConfigError, child_path, from_dict

F = TypeVar("F", bound=Callable)

ENTRY_POINT_GROUP = "flexbert.plugins"

# How a config picks an entry: its name, or a mapping of ``name`` and the entry's own options.
Choice = str | Mapping[str, Any]


class RegistryError(FlexBertError, KeyError):
    """An unknown name was asked of a registry, or a name was registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    factory: F  # called with ``options=`` as well when the entry has options
    description: str
    options: type | None = None  # the dataclass of the entry's own options, if it takes any


def split_choice(choice: Choice, path: str) -> tuple[str, dict[str, Any]]:
    """(name, options) of a config's choice; ``path`` is where the choice sits in the config."""
    if isinstance(choice, str):
        return choice, {}
    options = dict(choice)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(
            child_path(path, "name"),
            f"a choice given as a mapping names its entry here, with its options beside it; got {name!r}",
        )
    return name, options


class PluginError(FlexBertError, ImportError):
    """A plugin module advertised as an entry point failed to import."""


class Registry(Generic[F]):
    """Names → factories of one block family. ``signature`` is the Protocol a factory satisfies (or
    a sentence saying what it is called with)."""

    def __init__(self, family: str, signature: type[F] | str, description: str):
        self.family = family
        self.signature = signature if isinstance(signature, str) else _describe(signature)
        self.description = description
        self._entries: dict[str, Entry[F]] = {}
        CATALOGUE.add(self)

    def register(
        self, name: str, *, description: str | None = None, options: type | None = None
    ) -> Callable[[Callable], Callable]:
        """Decorator: ``@ATTENTION.register("rope")`` on a class or a factory function;
        ``options=SomeDataclass`` when it takes options of its own (as ``options=``)."""

        def decorate(factory: Callable) -> Callable:
            self.add(name, factory, description=description, options=options)
            return factory

        return decorate

    def add(self, name: str, factory: Callable, *, description: str | None = None, options: type | None = None) -> None:
        if not callable(factory):
            raise TypeError(f"{self.family} registry: {name!r} must be callable, got {factory!r}")
        existing = self._entries.get(name)
        if existing is not None and existing.factory is not factory:
            raise RegistryError(
                f"{self.family} registry: {name!r} is already registered by {_qualname(existing.factory)}"
            )
        first_paragraph = (factory.__doc__ or "").strip().split("\n\n")[0]
        doc = description or " ".join(line.strip() for line in first_paragraph.splitlines())
        if options is not None:
            doc += f" Options: {', '.join(field.name for field in dataclasses.fields(options))}."
        self._entries[name] = Entry(name, factory, doc, options)

    def get(self, choice: Choice, path: str | None = None) -> F:
        """The factory that ``choice`` picks, ready to call. Options given beside the name are checked
        against the entry's dataclass, errors naming ``path.<option>`` (``path``: where the choice
        sits in a config); unset ones take their defaults; the factory receives them as ``options=``."""
        load_entry_point_plugins()
        path = path or self.family
        name, options = split_choice(choice, path)
        try:
            entry = self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.family} {name!r}; registered {self.family} names: {', '.join(self.names())}"
            ) from None
        if entry.options is None:
            if options:
                raise ConfigError(child_path(path, next(iter(options))), f"{self.family} {name!r} takes no options")
            return entry.factory
        return functools.partial(entry.factory, options=from_dict(entry.options, options, path))

    def names(self) -> list[str]:
        load_entry_point_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry[F]]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        load_entry_point_plugins()
        return name in self._entries


class Catalogue:
    """Every registry created in the process, for ``flexbert registry`` and config validation."""

    def __init__(self) -> None:
        self._registries: dict[str, Registry] = {}

    def add(self, registry: Registry) -> None:
        if registry.family in self._registries:
            raise RegistryError(f"a registry for {registry.family!r} already exists")
        self._registries[registry.family] = registry

    def __iter__(self) -> Iterator[Registry]:
        return iter(self._registries.values())

    def __getitem__(self, family: str) -> Registry:
        return self._registries[family]


CATALOGUE = Catalogue()
_entry_points_loaded = False


def load_entry_point_plugins() -> None:
    """Import every module advertised in the ``flexbert.plugins`` entry-point group, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as err:
            raise PluginError(
                f"flexbert plugin entry point {entry_point.name!r} ({entry_point.value}) failed to import: {err}"
            ) from err


def import_plugins(module_paths: Iterable[str], key_path: str = "plugins") -> None:
    """Import user modules named in a config so that their blocks register themselves."""
    for index, module_path in enumerate(module_paths):
        try:
            importlib.import_module(module_path)
        except ImportError as err:
            raise ConfigError(f"{key_path}[{index}]", f"cannot import plugin module {module_path!r}: {err}") from err


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _describe(protocol: type) -> str:
    """``factory(config, layer_idx) -> <what the Protocol's docstring says it returns>``."""
    parameters = list(inspect.signature(protocol.__call__).parameters)[1:]  # all but self
    returns = " ".join(inspect.getdoc(protocol).split())
    return f"factory({', '.join(parameters)}) -> {returns}"

"""Typed registries: each block family maps names to factories, and configs pick blocks by name.

Users add blocks without editing this package in either of two ways:

* list an importable module under ``plugins:`` in the config; importing it runs its
  ``@REGISTRY.register("name")`` decorators;
* expose a module in the ``flexbert.plugins`` entry-point group of their own package; every such
  module is imported the first time any registry is queried.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)

ENTRY_POINT_GROUP = "flexbert.plugins"


class RegistryError(KeyError):
    """An unknown name was asked of a registry, or a name was registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    factory: F
    description: str


class Registry(Generic[F]):
    """Names → factories of one block family. ``signature`` documents what a factory is called with."""

    def __init__(self, family: str, signature: str, description: str):
        self.family = family
        self.signature = signature
        self.description = description
        self._entries: dict[str, Entry[F]] = {}
        CATALOGUE.add(self)

    def register(self, name: str, *, description: str | None = None) -> Callable[[F], F]:
        """Decorator: ``@ATTENTION.register("rope")`` on a class or a factory function."""

        def decorate(factory: F) -> F:
            self.add(name, factory, description=description)
            return factory

        return decorate

    def add(self, name: str, factory: F, *, description: str | None = None) -> None:
        if not callable(factory):
            raise TypeError(f"{self.family} registry: {name!r} must be callable, got {factory!r}")
        existing = self._entries.get(name)
        if existing is not None and existing.factory is not factory:
            raise RegistryError(
                f"{self.family} registry: {name!r} is already registered by "
                f"{_qualname(existing.factory)}"
            )
        first_paragraph = (factory.__doc__ or "").strip().split("\n\n")[0]
        doc = description or " ".join(line.strip() for line in first_paragraph.splitlines())
        self._entries[name] = Entry(name, factory, doc)

    def get(self, name: str) -> F:
        load_entry_point_plugins()
        try:
            return self._entries[name].factory
        except KeyError:
            raise RegistryError(
                f"unknown {self.family} {name!r}; registered {self.family} names: "
                f"{', '.join(self.names())}"
            ) from None

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
            raise ImportError(
                f"flexbert plugin entry point {entry_point.name!r} ({entry_point.value}) "
                f"failed to import: {err}"
            ) from err


def import_plugins(module_paths: Iterable[str], key_path: str = "plugins") -> None:
    """Import user modules named in a config so that their blocks register themselves."""
    for index, module_path in enumerate(module_paths):
        try:
            importlib.import_module(module_path)
        except ImportError as err:
            from flexbert.typed_config import ConfigError

            raise ConfigError(
                f"{key_path}[{index}]", f"cannot import plugin module {module_path!r}: {err}"
            ) from err


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"

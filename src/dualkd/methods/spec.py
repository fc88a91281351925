"""The `objective` section of a run config: `name` chooses its class from the registry (methods/__init__.py), so
a new objective joins with one line there (a static union would need every config class listed in it)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from dualkd.schema import ByKind


class _Configs(Mapping[str, type[ByKind]]):
    """The registry's config classes by name (the registry itself maps a name to (config class, factory))."""

    def __init__(self, registry: Mapping[str, tuple[type[ByKind], Any]]):
        self._registry = registry

    def __getitem__(self, name: str) -> type[ByKind]:
        return self._registry[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)


METHODS: dict[str, tuple[type[ByKind], Any]] = {}
"""Objectives by name: (config class, factory building the objective from its config); filled in methods/__init__.py."""


class ObjectiveSpec(ByKind):
    """The base of every objective's config class (which lives in the objective's own file)."""

    kinds: ClassVar[Mapping[str, type[ByKind]]] = _Configs(METHODS)
    tag: ClassVar[str] = "name"
    noun: ClassVar[str] = "objective"
    name: str

"""Name lookup over registered specs (samplers, schedulers, ...)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from modules.errors import InvalidParams

T = TypeVar("T")


def _keys(spec) -> Iterator[str]:
    yield spec.name
    if getattr(spec, "label", None):
        yield spec.label
    yield from getattr(spec, "aliases", ())


class NamedRegistry(Generic[T]):
    """Specs by display name, label or alias, matched case-insensitively."""

    def __init__(self, kind: str, specs: Iterable[T]) -> None:
        self.kind = kind
        self._specs: list[T] = []
        self._by_key: dict[str, T] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: T) -> None:
        if spec.name.lower() in self._by_key:
            raise ValueError(f"{self.kind} {spec.name!r} is registered twice")
        self._specs.append(spec)
        for key in _keys(spec):
            self._by_key.setdefault(key.lower(), spec)

    def get(self, name: str) -> T:
        spec = self._by_key.get(str(name).strip().lower())
        if spec is None:
            known = ", ".join(self.names())
            raise InvalidParams(f"Unknown {self.kind} {name!r}. Known: {known}")
        return spec

    def __contains__(self, name: str) -> bool:
        return str(name).strip().lower() in self._by_key

    def __iter__(self) -> Iterator[T]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return [getattr(s, "label", None) or s.name for s in self._specs]

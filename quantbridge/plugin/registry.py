"""Named registries of classes (backends, quantizers, kernels): register, list, look up, parse.

Each registry is filled by importing the built-in adapters and the entry points (`load`,
called once on first use), so looking a name up never depends on import order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from quantbridge.plugin.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, load: Callable[[], None]) -> None:
        self.kind = kind
        self._load = load
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make a class selectable by its `name`."""
        if cls.name in self.classes and self.classes[cls.name] is not cls:
            raise ValueError(f"{self.kind} name {cls.name!r} is registered twice")
        self.classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        self._load()
        return list(self.classes)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self.classes[name]()
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}") from None

    def parse(self, csv: str) -> list[str]:
        """'a,b' -> ['a', 'b'], every name checked; duplicates dropped, order kept."""
        out = list(dict.fromkeys(part.strip() for part in csv.split(",") if part.strip()))
        for name in out:
            self.get(name)
        if not out:
            raise UserError(f"no {self.kind} given; choose from: {', '.join(self.names())}")
        return out

"""Named registries of classes (backends, quantizers, kernels): register, list, look up, parse.

Each registry is filled on first use by `load_adapters`: every module of the built-in
adapters package and every `quantbridge.backends` entry point is imported once, and
importing a module registers what it defines. Looking a name up therefore never depends on
import order, and a new adapter file needs no list of modules edited.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from quantbridge.plugin.errors import UserError

T = TypeVar("T")


ADAPTERS = "quantbridge.adapters"  # imported by name: the plugin part never imports an adapter statically
ENTRY_POINTS = "quantbridge.backends"  # third-party modules that register backends, quantizers, kernels
# The order names are listed in (env, --help, errors). Adapter modules not named here are found and
# imported after these, so a new adapter file needs no edit here.
LISTED_FIRST = ("rtn", "fp16", "native", "tinygemm", "bnb", "bnb_int8", "gptq", "awq", "exllamav2", "gemlite",
                "autoawq", "gptqmodel", "gguf", "llamacpp")
_loaded = False


def load_adapters() -> None:
    """Import every built-in adapter module (those not starting with `_`) and every entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module(ADAPTERS)
    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    for mod in [m for m in LISTED_FIRST if m in found] + [m for m in found if m not in LISTED_FIRST]:
        importlib.import_module(f"{ADAPTERS}.{mod}")
    for ep in entry_points(group=ENTRY_POINTS):
        ep.load()


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.classes: dict[str, type[T]] = {}

    def _load(self) -> None:
        load_adapters()

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

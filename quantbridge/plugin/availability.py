"""Whether a backend, quantizer or kernel can run here, and why not: `Availability` and `ask`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why it is (not) available: library version, kernel for this device, how to install


OK = Availability(True, "")


def ask(question, *args) -> Availability:
    """`question(*args)` (an `available` or `can_implement`), with any exception it raises turned into a no.

    A library that is missing, half-installed or broken must make its kernel or backend a
    rejection with a one-line reason, never a crash of the row or of the chooser.
    """
    try:
        answer = question(*args)
    except Exception as e:  # noqa: BLE001 - whatever a third-party check raises, it is a "no" with a reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Availability(False, f"{getattr(question, '__name__', 'its check')} raised "
                                   f"{type(e).__name__}{': ' + first if first else ''}")
    if not isinstance(answer, Availability):
        return Availability(False, f"{getattr(question, '__name__', 'its check')} returned {answer!r}, "
                                   f"not an Availability")
    return answer


def pip_extra(extra: str) -> str:
    """The one-line command that installs quantbridge's optional `extra` and keeps the torch that is here.

    The pin makes pip keep the installed torch build (a CPU or CUDA build of this version)
    instead of replacing it with whatever the index offers for a dependency's looser
    requirement; an extra that needs another torch then fails to resolve, saying so.
    """
    return f"pip install 'quantbridge[{extra}]' 'torch=={torch.__version__.split('+')[0]}'"


def dist_version(name: str) -> str | None:
    """The installed version of a distribution (None when absent), without importing it."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None

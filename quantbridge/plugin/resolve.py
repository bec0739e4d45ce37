"""One resolver: names to registered backends, quantizers and kernels, checked for this machine.

compare, bench, convert, env and the vLLM plugin all turn user-given names into objects the
same way: look the name up (an unknown one is a one-line error listing the known ones), ask
whether its library and device kind are here, and, where a spec is given, whether it can
quantize to it. Each answer is a `Resolved` that keeps the reason; callers decide whether an
unavailable name stops the run or becomes an `unavailable` row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantbridge.plugin import backend as registry
from quantbridge.plugin.availability import Availability, ask
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.kernel import get_kernel
from quantbridge.plugin.quantizer import get_quantizer
from quantbridge.plugin.spec import QuantSpec


@dataclass(frozen=True)
class Resolved:
    name: str
    kind: str  # "backend", "quantizer" or "kernel"
    obj: object
    availability: Availability
    spec_problem: str | None = None  # why it cannot quantize to the given spec

    @property
    def ok(self) -> bool:
        return self.availability.ok and self.spec_problem is None

    @property
    def reason(self) -> str:
        """The library/device reason when unavailable, else the spec problem, else the version line."""
        if not self.availability.ok:
            return self.availability.reason
        return self.spec_problem or self.availability.reason

    @property
    def install_hint(self) -> str:
        return getattr(self.obj, "install_hint", "") or ""

    def message(self) -> str:
        """One line for an error: what, why, and how to install when that is the fix."""
        hint = self.install_hint
        if self.availability.ok or not hint or hint in self.reason:
            hint = ""
        return f"{self.kind} {self.name} is unavailable: {self.reason}" + (f"; {hint}" if hint else "")


def _spec_problem(obj, spec: QuantSpec | None) -> str | None:
    if spec is None or not hasattr(obj, "check_spec"):
        return None
    try:
        obj.check_spec(spec)
    except UserError as e:
        return str(e)
    return None


def backend(name: str, device: torch.device, spec: QuantSpec | None = None) -> Resolved:
    b = registry.get(name)
    a = ask(b.available, device)
    return Resolved(name, "backend", b, a, _spec_problem(b, spec) if a.ok else None)


def backends(names: list[str], device: torch.device, spec: QuantSpec | None = None) -> list[Resolved]:
    """The reference first (every comparison and benchmark measures against it), then `names`."""
    ref = registry.reference_name()
    return [backend(n, device, spec) for n in [ref] + [n for n in names if n != ref]]


def quantizer(name: str, device: torch.device, spec: QuantSpec | None = None) -> Resolved:
    q = get_quantizer(name)
    a = ask(q.available, device)
    return Resolved(name, "quantizer", q, a, _spec_problem(q, spec) if a.ok else None)


def kernel(name: str, device: torch.device) -> Resolved:
    """A kernel's own limits are per weight (`can_implement`): only the library and device here."""
    k = get_kernel(name)
    return Resolved(name, "kernel", k, ask(k.available, device))


def require(r: Resolved) -> Resolved:
    """`r`, or a one-line UserError naming why it cannot run and the fix."""
    if not r.availability.ok:
        raise UserError(r.message())
    if r.spec_problem:
        raise UserError(r.spec_problem)
    return r


def int4_runners() -> list[str]:
    """Backends that can run INT4 weights made elsewhere (a checkpoint, `--weights`, vLLM)."""
    return [n for n in registry.names() if registry.get(n).runs_int4()]

"""A comparison's rows, typed: what each row runs, settled by the request check before any work.

A row is one of five kinds, and the row runner matches on the kind, never on the row's name:
the reference (the unquantized backend every row is measured against), a backend (its own
weights, or the shared ones through its kernels), an engine (runs the whole model itself), a
kernel row (the shared weights through exactly one kernel: `--kernels`) and the plan (each layer
from the backend a mixed-precision plan assigns it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    REFERENCE = "reference"
    BACKEND = "backend"
    ENGINE = "engine"
    KERNEL = "kernel"
    PLAN = "plan"


@dataclass(frozen=True)
class Shared:
    """Weights every row runs, so that rows differ only in the kernel: a `--weights` backend's
    algorithm's, or (backend None) the quantized checkpoint's own."""

    backend: str | None = None
    checkpoint_format: str = ""  # the checkpoint's format, for the rows' weights label

    @property
    def from_checkpoint(self) -> bool:
        return self.backend is None

    @property
    def name(self) -> str:
        """What kernel rows are named after: `gptq+exllamav2`, `checkpoint+triton`."""
        return self.backend or "checkpoint"

    @property
    def label(self) -> str:
        return f"checkpoint ({self.checkpoint_format})" if self.from_checkpoint else f"{self.backend} (shared)"


PLAN_ROW = "plan"  # the plan row's name in results


@dataclass(frozen=True)
class RowSpec:
    name: str  # as results name it
    kind: Kind
    backend: str | None = None  # the registered backend (reference, backend and engine rows)
    kernel: str | None = None  # the one kernel (kernel rows)

    @property
    def role(self) -> str:
        """The results' role: what reports, plan and recommendations select rows by."""
        return {Kind.REFERENCE: "reference", Kind.PLAN: "plan"}.get(self.kind, "measured")

    @classmethod
    def plan(cls) -> RowSpec:
        return cls(PLAN_ROW, Kind.PLAN)

    @classmethod
    def of_kernel(cls, shared: Shared, kernel: str) -> RowSpec:
        return cls(f"{shared.name}+{kernel}", Kind.KERNEL, kernel=kernel)

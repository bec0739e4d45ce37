"""Kernels (who multiplies) and the chooser that picks one for a weight.

A Kernel turns a canonical Int4Weight into a QuantLinear in the kernel's own layout. Before
that, `can_implement(weight, device, dtype)` says whether it can run this weight here (its
library, device kind, activation dtype, group size, shape limits, act-order), with the reason
when it cannot. `choose` tries kernels in a stated priority order and returns the first that
can, together with every rejected one and why: the shape of vLLM's
`choose_mp_linear_kernel`. Adapters register kernels by name; the core never names one.

`PRIORITY` is the one order for the whole program. A backend that runs a quantizer's weights
through the best kernel here tries the kernels that take that quantizer's `layout`, in this
order; `--kernels` (compare and bench) runs exactly the kernels named. Adding a kernel is one
module in adapters/ (or kernels/) plus its name in `PRIORITY`; a third party's kernel,
registered through an entry point, comes after the listed ones.

The chooser asks `available` first and `can_implement` only of a kernel whose library is
here, so `can_implement` may import its library. Whatever either raises becomes that
kernel's rejection (backend.ask), and a library that fails to import when a layer is built
passes the weight on to the next kernel (`build_first`): a missing or broken optional
library never fails a row that another kernel can run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantbridge.plugin.availability import OK, Availability, ask
from quantbridge.plugin.errors import NotRunnable, UserError
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.registry import Registry
from quantbridge.plugin.spec import QuantSpec

# Fastest first: vLLM's own kernels in vLLM's order (its CUDA chooser tries Machete, then
# Marlin, then exllama), the other engines' kernels, then ours, then the libraries' layouts
# decoded once and multiplied by the torch reference, which runs anywhere.
PRIORITY = ("machete", "marlin", "vllm-exllama", "exllamav2", "autoawq", "gemlite", "gptqmodel-torch",
            "gptqmodel-awq-torch", "triton", "tinygemm", "gptq-layout", "awq-layout", "reference")
DTYPE_FLAGS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}  # as --dtype spells them
NO_OFFSETS = ("its layout has integer zero-points only; these weights have a float offset per group "
              "(GGUF Q4_1/Q4_K: w = q*s + m)")


class Kernel:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    # Whether it runs weights with float offsets per group (w = q * s + m: GGUF Q4_1, Q4_K) as
    # well as integer zero-points; the chooser passes over those that do not.
    takes_offsets: ClassVar[bool] = False
    # The weight layouts (a quantizer's `layout`: "native", "gptq", "awq", "gguf") this kernel is a
    # candidate for when a backend picks the best kernel here. `--kernels` may name it for any weight.
    layouts: ClassVar[tuple[str, ...]] = ()
    # The activation dtypes it computes in (None: any). Declared, so a command can refuse a kernel
    # named for a dtype it never takes before any work; can_implement checks it through dtype_check.
    activation_dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None

    def dtype_check(self, dtype: torch.dtype) -> Availability:
        """Whether it computes in `dtype`, with what to pass instead when not."""
        if self.activation_dtypes is None or dtype in self.activation_dtypes:
            return OK
        names = [DTYPE_FLAGS[d] for d in self.activation_dtypes]
        return Availability(False, f"{'/'.join(names)} activations only, not {str(dtype).removeprefix('torch.')} "
                                   f"(use --dtype {' or '.join(names)})")

    def available(self, device: torch.device) -> Availability:
        """Whether the kernel's library and device kind are here at all (library and version when so)."""
        return Availability(True, "built in")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        """Whether this weight can run through this kernel here; the reason when it cannot."""
        return OK

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        raise NotImplementedError


KERNELS: Registry[Kernel] = Registry("kernel")
register_kernel = KERNELS.register
get_kernel = KERNELS.get
parse_kernels = KERNELS.parse


def refuse_dtype(names: Sequence[str], dtype: torch.dtype, device: torch.device) -> None:
    """UserError for the first kernel named (--kernels) that could run here but never computes in this
    activation dtype: known before any work, so a command stops before it starts rather than report
    the row after. A kernel that cannot run here at all is left to its row, which says why."""
    for name in names:
        k = get_kernel(name)
        check = k.dtype_check(dtype)
        if not check.ok and ask(k.available, device).ok:
            raise UserError(f"--kernels {name}: {check.reason}")


def kernel_names() -> list[str]:
    """Every registered kernel: those in PRIORITY in that order, then any others in registration order."""
    names = KERNELS.names()
    return [n for n in PRIORITY if n in names] + [n for n in names if n not in PRIORITY]


def kernels_for(layout: str) -> tuple[str, ...]:
    """The kernels that take weights of `layout`, in the one priority order."""
    return tuple(n for n in kernel_names() if layout in KERNELS.classes[n].layouts)


@dataclass(frozen=True)
class Choice:
    """The kernel chosen for one weight (None when none can), and every rejected one with why."""

    kernel: Kernel | None
    rejected: tuple[tuple[str, str], ...] = ()

    @property
    def why_not(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in self.rejected)


def choose(names: Sequence[str], weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Choice:
    """The first of `names` (in that priority order) that can run `weight` here."""
    rejected = []
    for name in names:
        k = get_kernel(name)
        if weight.offsets is not None and not k.takes_offsets:
            rejected.append((name, NO_OFFSETS))
            continue
        # In this order, one at a time: can_implement may need the library that available checks for.
        check = ask(k.available, device)
        if check.ok:
            check = ask(k.can_implement, weight, device, dtype)
        if not check.ok:
            rejected.append((name, check.reason))
            continue
        return Choice(k, tuple(rejected))
    return Choice(None, tuple(rejected))


def build_first(names: Sequence[str], weight: Int4Weight,
                bias: torch.Tensor | None) -> tuple[QuantLinear | None, tuple[tuple[str, str], ...]]:
    """The layer of the first of `names` that can run `weight` (on its device, activations in its
    scales' dtype) and builds, and every kernel passed over with why.

    A kernel whose library is found but fails to import when the layer is built (a half
    installed package, a missing dependency of it) is passed over like any other.
    """
    rejected: list[tuple[str, str]] = []
    remaining = list(names)
    while remaining:
        choice = choose(remaining, weight, weight.qweight.device, weight.scales.dtype)
        rejected += choice.rejected
        if choice.kernel is None:
            break
        try:
            return choice.kernel.build(weight, bias), tuple(rejected)
        except ImportError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = choice.kernel.install_hint
            rejected.append((choice.kernel.name, f"its library failed to import ({first})"
                             + (f"; reinstall it: {hint}" if hint else "")))
            remaining = remaining[remaining.index(choice.kernel.name) + 1:]
    return None, tuple(rejected)


def build_exactly(name: str, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
    """`weight` through exactly kernel `name` (a `--kernels` row); NotRunnable with the kernel's reason
    when it cannot run it here."""
    layer, rejected = build_first([name], weight, bias)
    if layer is None:
        raise NotRunnable(rejected[0][1])
    return layer


def probe_weight(out_features: int, in_features: int, spec: QuantSpec, dtype: torch.dtype,
                 device: torch.device) -> Int4Weight:
    """A weight of this shape with the structure `spec` gives it (group size, act-order, symmetric or
    fitted zero-points), to ask kernels whether they can run such weights before the real ones exist.

    Its values mean nothing: every tensor is one constant broadcast to its shape, so even a
    large layer costs a few bytes. Limits that depend on the values (exllamav2 cannot hold a
    zero-point of 0) are decided per layer when the row builds its layers.
    """
    g = spec.group_for(in_features)
    groups = in_features // g

    def const(value, shape, dt):
        return torch.full((1, 1), value, dtype=dt, device=device).expand(*shape)

    zero = 8 if spec.symmetric else 7  # a fitted zero-point: any code, here one a v1 layout can hold
    perm = torch.arange(in_features, device=device) if spec.act_order else None
    return Int4Weight(const(0x77, (out_features, in_features // 2), torch.uint8), const(1.0, (out_features, groups), dtype),
                      const(zero, (out_features, groups), torch.uint8), g, perm)

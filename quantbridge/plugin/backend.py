"""The backend interface: Backend, QuantLinear, Availability, and the name registry.

Nothing in the core knows a backend by name: adapters register themselves here, and
third-party packages add theirs through the `quantbridge.backends` entry-point group.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import nn

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.registry import Registry
from quantbridge.plugin.spec import QuantSpec


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why it is (not) available: library version, kernel for this device, how to install


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
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


class QuantLinear(nn.Module):
    """A linear layer as one backend stores and runs it.

    `kernel` names the code that really runs in forward (e.g. "reference-torch"), so a
    fallback is never reported as a library's kernel.
    """

    kernel: str = "unknown"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight_nbytes(self) -> int:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The [N, K] weight this layer effectively multiplies by, in float32."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@dataclass(frozen=True)
class Calibration:
    """Token ids a calibrating algorithm (GPTQ, AWQ) runs through the model."""

    input_ids: torch.Tensor  # [samples, length]
    digest: str  # identifies the text and sampling, for the quantized-weights cache
    tokenizer: object = field(default=None, compare=False)  # the model's, for libraries that ask for it
    progress: object = field(default=None, compare=False)  # begin(description, total) / advance(): rows.Progress


class Backend:
    """A name users pick (`--backends native`): a quantizer's weights through the best kernel here.

    Most backends are a pairing: `quantizer` names the registered Quantizer that makes the
    weights and `kernels` the registered Kernels that can run them, in priority order (the
    chooser in kernel.py takes the first that can run each weight, and says why it passed
    over the others). Fused backends (the unquantized reference, bitsandbytes' code books)
    override `quantize` instead. The three ways a backend turns a model's linears into its
    own layers:
      quantize(linear)             layer by layer (RTN-style, bitsandbytes);
      quantize_weights(model, ...) a whole-model algorithm producing canonical Int4Weights
                                   (GPTQ, AWQ); the core caches these and calls from_int4;
      from_int4(weight)            run weights made elsewhere (`compare --weights`, a
                                   quantized checkpoint) through this backend's kernels.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    quantized: ClassVar[bool] = True  # False for unquantized backends
    reference: ClassVar[bool] = False  # the unquantized backend every comparison measures against (one of them)
    algorithm: ClassVar[str] = ""  # how a fused backend makes its weights ("nf4", ...); pairings take the quantizer's
    quantizer: ClassVar[str | None] = None  # the registered quantizer that makes this backend's weights
    kernels: ClassVar[tuple[str, ...]] = ()  # registered kernels that run them, in priority order

    def _quantizer(self):
        from quantbridge.plugin.quantizer import get_quantizer

        return get_quantizer(self.quantizer) if self.quantizer else None

    @property
    def needs_calibration(self) -> bool:
        q = self._quantizer()
        return bool(q and q.needs_calibration)

    # An engine runs the whole model itself (llama.cpp): no layers are swapped in, so its row has
    # whole-model figures only, from measure_engine.
    engine: ClassVar[bool] = False

    def measure_engine(self, model: nn.Module, ref, settings, device: torch.device):
        """The row of an engine backend (a results.BackendResult); `ref` is the comparison's reference.Reference."""
        raise NotImplementedError

    @property
    def whole_model(self) -> bool:
        """Its weights are made for the whole model at once (calibrated, or read from the model's file)."""
        q = self._quantizer()
        return bool(q and (q.needs_calibration or getattr(q, "reads_model", False)))

    @property
    def weights_label(self) -> str:
        q = self._quantizer()
        return (q.algorithm or q.name) if q else (self.algorithm or self.name)

    def available(self, device: torch.device) -> Availability:
        q = self._quantizer()
        if q is None:
            return Availability(True, "built in")
        qa = ask(q.available, device)
        if not qa.ok or not self.kernels:
            return qa
        from quantbridge.plugin.kernel import get_kernel

        ks = [(k, ask(get_kernel(k).available, device)) for k in self.kernels]
        here = [f"{k} ({a.reason})" for k, a in ks if a.ok]
        away = [f"{k} ({a.reason})" for k, a in ks if not a.ok]
        if not here:
            return Availability(False, "no kernel runs here: " + "; ".join(away))
        return Availability(True, f"{qa.reason}; kernels here: {', '.join(here)}"
                                  + (f"; not here: {', '.join(away)}" if away else ""))

    def check_spec(self, spec: QuantSpec) -> None:
        """Raise UserError if this backend cannot do `spec` at all."""
        q = self._quantizer()
        if q is not None:
            q.check_spec(spec)

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """One layer, from its float weight."""
        return self.from_int4(self.quantize_weights_of(linear, spec), linear.bias)

    def quantize_weights_of(self, linear: nn.Linear, spec: QuantSpec) -> Int4Weight:
        q = self._quantizer()
        if q is None or q.needs_calibration:
            raise NotImplementedError(f"{self.name} has no layer-wise quantizer")
        return q.quantize_layer(linear, spec)

    def quantize_weights(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                         calib: Calibration | None) -> dict[str, Int4Weight] | None:
        """Canonical weights for every layer in `linears` (module path -> layer of `model`).

        None: this backend's weights are not made by a whole-model algorithm (use quantize per layer).
        """
        q = self._quantizer()
        return q.quantize(model, linears, spec, calib) if q is not None and q.needs_calibration else None

    def export(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
               calib: Calibration | None) -> tuple[nn.Module, dict[str, Int4Weight]]:
        """(model, weights) for a checkpoint: algorithms that fold factors into other layers (AWQ)
        return the model with them folded and plain weights; others the model unchanged."""
        q = self._quantizer()
        if q is not None and hasattr(q, "export"):
            return q.export(model, linears, spec, calib)
        ws = self.quantize_weights(model, linears, spec, calib)
        if ws is None:
            ws = {n: self.quantize_weights_of(lin, spec) for n, lin in linears.items()}
        return model, ws

    def from_int4(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        """The first of `kernels` that can run `weight` (activations in the scales' dtype, on its device)."""
        if not self.kernels:
            raise NotImplementedError(f"{self.name} cannot run canonical INT4 weights made elsewhere")
        from quantbridge.plugin.kernel import build_first

        layer, rejected = build_first(self.kernels, weight, bias)
        if layer is None:
            raise UserError(f"no kernel of {self.name} can run this weight: "
                            + "; ".join(f"{name}: {reason}" for name, reason in rejected))
        layer.rejected_kernels = rejected  # what the chooser passed over, and why
        return layer

    @classmethod
    def runs_int4(cls) -> bool:
        """Whether from_int4 is implemented, i.e. shared weights can run through this kernel."""
        return bool(cls.kernels) or cls.from_int4 is not Backend.from_int4


_BUILTINS = ("rtn", "fp16", "native", "tinygemm", "bnb", "bnb_int8", "gptq", "awq", "exllamav2", "gemlite", "autoawq", "gptqmodel", "gguf", "llamacpp")  # modules under quantbridge.adapters
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTINS:
        importlib.import_module(f"quantbridge.adapters.{mod}")
    for ep in entry_points(group="quantbridge.backends"):
        ep.load()  # importing the module registers its backends (and quantizers, kernels)


BACKENDS: Registry[Backend] = Registry("backend", _load_all)
_REGISTRY = BACKENDS.classes
register = BACKENDS.register
names = BACKENDS.names
get = BACKENDS.get
parse_names = BACKENDS.parse


def reference_name() -> str:
    """The registered backend marked `reference = True` every comparison measures against."""
    _load_all()
    refs = [n for n, cls in _REGISTRY.items() if cls.reference]
    if len(refs) != 1:
        raise UserError(f"exactly one backend may be the reference (reference = True); registered: {refs or 'none'}")
    return refs[0]

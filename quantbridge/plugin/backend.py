"""Backends: the names users pick (`--backends native`), in three kinds, and their registry.

- `Pairing`: a quantizer's weights through the best kernel here (the chooser in kernel.py
  tries the kernels that take the quantizer's layout, in the one priority order), or through
  the kernels a backend pins;
- `Fused`: codes and kernel are one library's (bitsandbytes' code books, the unquantized
  reference): it quantizes each layer itself;
- `Engine`: runs the whole model itself (llama.cpp) and returns plain figures, which the core
  turns into a row.
Nothing in the core knows a backend by name: adapters register themselves here, and
third-party packages add theirs through the `quantbridge.backends` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from quantbridge.plugin.availability import Availability, ask
from quantbridge.plugin.errors import NoKernel, UserError
from quantbridge.plugin.kernel import build_first, get_kernel, kernels_for
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.quantizer import Calibration, ModelCodes, Quantizer, get_quantizer
from quantbridge.plugin.registry import Registry, load_adapters
from quantbridge.plugin.spec import QuantSpec


class Backend:
    """What every kind of backend has: a name, whether it runs here, what it cannot quantize to."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    quantized: ClassVar[bool] = True  # False for unquantized backends
    reference: ClassVar[bool] = False  # the unquantized backend every comparison measures against (one of them)
    needs_calibration: ClassVar[bool] = False
    whole_model: ClassVar[bool] = False  # its weights are made for the whole model at once
    quantizer: ClassVar[str | None] = None  # a pairing's quantizer; none for the other kinds
    kernels: tuple[str, ...] = ()  # the kernels tried for its weights, in order (a pairing's); none for the others

    @property
    def weights_label(self) -> str:
        return self.name

    def available(self, device: torch.device) -> Availability:
        return Availability(True, "built in")

    def check_spec(self, spec: QuantSpec) -> None:
        """Raise UserError if this backend cannot do `spec` at all."""

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """One layer, from its float weight."""
        raise NotImplementedError(f"{self.name} does not quantize layer by layer")

    @classmethod
    def runs_int4(cls) -> bool:
        """Whether it runs canonical INT4 weights made elsewhere (`from_int4`)."""
        return False


class Fused(Backend):
    """Codes and kernel of one library (bitsandbytes, the unquantized reference): `quantize` per layer."""

    algorithm: ClassVar[str] = ""  # how it makes its weights ("nf4", ...)

    @property
    def weights_label(self) -> str:
        return self.algorithm or self.name


@dataclass(frozen=True)
class EngineRun:
    """What an engine row is given: the file the model came from and the comparison's plain settings."""

    model_file: Path | None  # the GGUF (or other) file the model was loaded from; None when none
    eval_ids: torch.Tensor  # [sequences, length]: the held-out token ids every row is scored on
    reference_loss: float
    batches: list[int]
    prefill: int | None
    runs: int
    warmup: int


@dataclass
class EngineFigures:
    """An engine row's plain figures; the core makes the row (perplexity, tokens/s, latencies) from them."""

    kernel: str  # what ran, with its library and version
    weights: str  # whose codes, e.g. "gguf file (Q4_1, Q6_K)"
    timing: str  # how its times were taken
    weight_bytes: int
    eval_loss: float  # next-token loss on EngineRun.eval_ids, averaged over every position
    decode_us: list[float]  # one decode step at M = 1 after a prefix, per timed run
    prefill_us: list[float] = field(default_factory=list)  # the whole prefill of EngineRun.prefill tokens, per run
    notes: dict = field(default_factory=dict)  # facts shown as they are (engine, threads, what is not per layer)
    not_measured: dict[int, str] = field(default_factory=dict)  # decode M -> why it was not measured


class Engine(Backend):
    """Runs the whole model itself (llama.cpp): no layers are swapped in, so its row has
    whole-model figures only. `measure` raises NotRunnable (with the reason) when it cannot."""

    whole_model: ClassVar[bool] = True

    def measure(self, run: EngineRun) -> EngineFigures:
        raise NotImplementedError


class Pairing(Backend):
    """A quantizer's weights through a kernel. The three ways it turns a model's linears into layers:
      quantize(linear)             layer by layer (round-to-nearest);
      quantize_weights(model, ...) a whole-model algorithm producing canonical Int4Weights
                                   (GPTQ, AWQ); the core caches these and calls from_int4;
      from_int4(weight)            run weights made elsewhere (`compare --weights`, a
                                   quantized checkpoint) through this backend's kernels.
    """

    quantizer: ClassVar[str]  # the registered quantizer that makes this backend's weights
    # Exactly these kernels, in this order, instead of the priority list for the quantizer's layout.
    pinned: ClassVar[tuple[str, ...]] = ()

    def _quantizer(self) -> Quantizer:
        return get_quantizer(self.quantizer)

    @property
    def kernels(self) -> tuple[str, ...]:
        """The kernels tried for this backend's weights, in order."""
        return self.pinned or kernels_for(self._quantizer().layout)

    @property
    def needs_calibration(self) -> bool:
        return self._quantizer().needs_calibration

    @property
    def reads_model(self) -> bool:
        return self._quantizer().reads_model

    @property
    def whole_model(self) -> bool:
        q = self._quantizer()
        return q.needs_calibration or q.reads_model

    @property
    def weights_label(self) -> str:
        q = self._quantizer()
        return q.algorithm or q.name

    def available(self, device: torch.device) -> Availability:
        qa = ask(self._quantizer().available, device)
        if not qa.ok:
            return qa
        ks = [(k, ask(get_kernel(k).available, device)) for k in self.kernels]
        here = [f"{k} ({a.reason})" for k, a in ks if a.ok]
        away = [f"{k} ({a.reason})" for k, a in ks if not a.ok]
        if not here:
            return Availability(False, "no kernel runs here: " + "; ".join(away))
        return Availability(True, f"{qa.reason}; kernels here: {', '.join(here)}"
                                  + (f"; not here: {', '.join(away)}" if away else ""))

    def check_spec(self, spec: QuantSpec) -> None:
        self._quantizer().check_spec(spec)

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        return self.from_int4(self.quantize_weights_of(linear, spec), linear.bias)

    def quantize_weights_of(self, linear: nn.Linear, spec: QuantSpec) -> Int4Weight:
        q = self._quantizer()
        if q.needs_calibration or q.reads_model:
            raise NotImplementedError(f"{self.name} has no layer-wise quantizer")
        return q.quantize_layer(linear, spec)

    def quantize_weights(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                         calib: Calibration | None) -> dict[str, Int4Weight] | None:
        """Canonical weights for every layer in `linears` (module path -> layer of `model`).

        None: this backend's weights are not made by a whole-model algorithm (use quantize per layer).
        """
        q = self._quantizer()
        return q.quantize(model, linears, spec, calib) if q.needs_calibration else None

    def read_weights(self, codes: ModelCodes | None, linears: dict[str, nn.Linear]) -> dict[str, Int4Weight]:
        """The model file's own codes (a `reads_model` quantizer's), for every layer in `linears`."""
        return self._quantizer().read(codes, linears)

    def export(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
               calib: Calibration | None) -> tuple[nn.Module, dict[str, Int4Weight]]:
        """(model, weights) for a checkpoint: algorithms that fold factors into other layers (AWQ)
        return the model with them folded and plain weights; others the model unchanged."""
        q = self._quantizer()
        if hasattr(q, "export"):
            return q.export(model, linears, spec, calib)
        ws = self.quantize_weights(model, linears, spec, calib)
        if ws is None:
            ws = {n: self.quantize_weights_of(lin, spec) for n, lin in linears.items()}
        return model, ws

    def from_int4(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        """The first of `kernels` that can run `weight` (activations in the scales' dtype, on its device)."""
        layer, rejected = build_first(self.kernels, weight, bias)
        if layer is None:
            raise NoKernel(f"no kernel of {self.name} can run this weight: "
                            + "; ".join(f"{name}: {reason}" for name, reason in rejected))
        layer.rejected_kernels = rejected  # what the chooser passed over, and why
        return layer

    @classmethod
    def runs_int4(cls) -> bool:
        return True


BACKENDS: Registry[Backend] = Registry("backend")
register = BACKENDS.register
names = BACKENDS.names
get = BACKENDS.get
parse_names = BACKENDS.parse


def reference_name() -> str:
    """The registered backend marked `reference = True` every comparison measures against."""
    load_adapters()
    refs = [n for n, cls in BACKENDS.classes.items() if cls.reference]
    if len(refs) != 1:
        raise UserError(f"exactly one backend may be the reference (reference = True); registered: {refs or 'none'}")
    return refs[0]

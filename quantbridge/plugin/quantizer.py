"""Quantizers (how codes are chosen): each yields canonical Int4Weights for a model's layers.

Round-to-nearest works layer by layer; GPTQ and AWQ calibrate on the whole model. The core
caches calibrated weights (run/rows.WeightSource); a kernel (kernel.py) then runs them.
A quantizer names the weight `layout` it makes (the format its checkpoints are stored in):
the chooser runs such weights through the kernels of that layout, in the one priority order.
bitsandbytes stays a fused backend: its codes are a code book, not INT4 integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from quantbridge.plugin.availability import Availability
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.registry import Registry, load_adapters
from quantbridge.plugin.spec import QuantSpec


@dataclass(frozen=True)
class Calibration:
    """Token ids a calibrating algorithm (GPTQ, AWQ) runs through the model."""

    input_ids: torch.Tensor  # [samples, length]
    digest: str  # identifies the text and sampling, for the quantized-weights cache
    tokenizer: object = field(default=None, compare=False)  # the model's, for libraries that ask for it
    progress: object = field(default=None, compare=False)  # begin(description, total) / advance(): rows.Progress


@dataclass(frozen=True)
class ModelCodes:
    """The INT4 codes a model's own file holds (a GGUF's Q4 tensors), for quantizers that read
    codes rather than choose them. Made by the model loader; `source` names the file."""

    source: str
    weights: dict[str, Int4Weight]  # module path -> codes, scales as the file stores them
    kinds: dict[str, str]  # module path -> the file's tensor type (Q4_1, ...)
    others: dict[str, str]  # linears the file holds in another type (or not at all): why


class Quantizer:
    name: ClassVar[str]
    algorithm: ClassVar[str] = ""  # the label a row's `weights` shows ("rtn", "gptq", "awq")
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    layout: ClassVar[str] = "native"  # the weight layout it makes: kernels that take this layout run them
    reads_model: ClassVar[bool] = False  # its codes come from the model's own files (GGUF), whole-model, uncached
    baseline: ClassVar[bool] = False  # the plain quantizer that calibrated ones are compared with (findings)

    def available(self, device: torch.device) -> Availability:
        return Availability(True, "built in")

    def check_spec(self, spec: QuantSpec) -> None:
        """Raise UserError if this quantizer cannot make weights of `spec`."""

    def quantize_layer(self, linear: nn.Linear, spec: QuantSpec) -> Int4Weight:
        raise NotImplementedError(f"{self.name} quantizes the whole model, not layer by layer")

    def quantize(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                 calib: Calibration | None) -> dict[str, Int4Weight]:
        """Canonical weights for every layer in `linears` (module path -> layer of `model`)."""
        return {n: self.quantize_layer(lin, spec) for n, lin in linears.items()}

    def read(self, codes: ModelCodes | None, linears: dict[str, nn.Linear]) -> dict[str, Int4Weight]:
        """A `reads_model` quantizer's weights: the model file's own codes for every layer in `linears`
        (None: the model came from no such file). Raises NotRunnable with the reason when it cannot."""
        raise NotImplementedError(f"{self.name} chooses its codes; it reads none")


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
register_quantizer = QUANTIZERS.register
quantizer_names = QUANTIZERS.names
get_quantizer = QUANTIZERS.get


def baseline_label() -> str | None:
    """The weights label of the baseline quantizer (round-to-nearest), if one is registered."""
    load_adapters()
    return next((cls.algorithm or cls.name for cls in QUANTIZERS.classes.values() if cls.baseline), None)

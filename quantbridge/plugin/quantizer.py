"""Quantizers (how codes are chosen): each yields canonical Int4Weights for a model's layers.

Round-to-nearest works layer by layer; GPTQ and AWQ calibrate on the whole model. The core
caches calibrated weights (rows.WeightSource); a kernel (kernel.py) then runs them.
bitsandbytes stays a fused backend: its codes are a code book, not INT4 integers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from quantbridge.plugin.backend import Availability, Calibration, _load_all
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.registry import Registry
from quantbridge.plugin.spec import QuantSpec


class Quantizer:
    name: ClassVar[str]
    algorithm: ClassVar[str] = ""  # the label a row's `weights` shows ("rtn", "gptq", "awq")
    description: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
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


QUANTIZERS: Registry[Quantizer] = Registry("quantizer", _load_all)
register_quantizer = QUANTIZERS.register
quantizer_names = QUANTIZERS.names
get_quantizer = QUANTIZERS.get


def baseline_label() -> str | None:
    """The weights label of the baseline quantizer (round-to-nearest), if one is registered."""
    _load_all()
    return next((cls.algorithm or cls.name for cls in QUANTIZERS.classes.values() if cls.baseline), None)

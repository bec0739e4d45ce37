"""bnb-nf4, bnb-fp4 (and -dq variants): bitsandbytes' Linear4bit, quantized by bitsandbytes.

bitsandbytes quantizes block-wise with an absmax scale per block (no zero-point) onto the
NF4 or FP4 code book; the spec's group size becomes the block size. `-dq` compresses the
absmax scales themselves (double quantization).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

import torch
from torch import nn

from quantbridge.plugin.availability import Availability, pip_extra
from quantbridge.plugin.backend import Fused, register
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.spec import QuantSpec

BLOCK_SIZES = (32, 64, 128)


def _bnb_version() -> str | None:
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def import_bnb():
    """bitsandbytes, imported on first use (it takes seconds, and `quantbridge env` need not).

    Its CPU backend logs a warning at import when the optional `kernels` package (hub kernels
    for one AVX-512 path) is missing; its own fallback runs instead, so that line is dropped.
    """
    import logging

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        log.setLevel(level)
    return bitsandbytes


class BnbLinear(QuantLinear):
    def __init__(self, linear: nn.Linear, quant_type: str, blocksize: int, double_quant: bool) -> None:
        bnb = import_bnb()

        super().__init__(linear.in_features, linear.out_features)
        dev, dtype = linear.weight.device, linear.weight.dtype
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=double_quant, quant_type=quant_type,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                         blocksize=blocksize, compress_statistics=double_quant,
                                         quant_type=quant_type, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.layer = layer.to(dev)  # bitsandbytes quantizes on this move
        if not self.layer.weight.bnb_quantized:
            raise RuntimeError("bitsandbytes did not quantize the weight on .to(device)")
        # matmul_4bit takes the gemv_4bit kernel for one token, dequantize + matmul otherwise.
        self.kernel = f"bitsandbytes.matmul_4bit[{dev.type}]"

    @property
    def weight_nbytes(self) -> int:
        qs = self.layer.weight.quant_state
        tensors = [self.layer.weight.data, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.state2.absmax, qs.state2.code]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self) -> torch.Tensor:
        F = import_bnb().functional

        w = self.layer.weight
        return F.dequantize_4bit(w.data, w.quant_state).float().reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _BnbBackend(Fused):
    quant_type: str = "nf4"
    algorithm = "absmax code book"
    double_quant: bool = False
    install_hint = pip_extra("bnb")

    def available(self, device: torch.device) -> Availability:
        # Metadata and find_spec only: importing bitsandbytes takes seconds. A broken install
        # then fails when its first layer is built, and that row is recorded as failed.
        v = _bnb_version()
        if v is None or find_spec("bitsandbytes") is None:
            return Availability(False, "bitsandbytes is not installed")
        where = "CUDA kernels" if device.type == "cuda" else f"{device.type} implementation"
        return Availability(True, f"bitsandbytes {v}, {where}")

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.group_size not in BLOCK_SIZES:
            raise UserError(f"{self.name} needs a block size of {', '.join(map(str, BLOCK_SIZES))} "
                            f"(--group-size {spec.group_size} given)")

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        return BnbLinear(linear, self.quant_type, spec.group_size, self.double_quant)


@register
class BnbNF4(_BnbBackend):
    name = "bnb-nf4"
    description = "bitsandbytes NF4 (normal-float code book, absmax per block)"


@register
class BnbFP4(_BnbBackend):
    name = "bnb-fp4"
    quant_type = "fp4"
    description = "bitsandbytes FP4 (e2m1 code book, absmax per block)"


@register
class BnbNF4DoubleQuant(_BnbBackend):
    name = "bnb-nf4-dq"
    double_quant = True
    description = "bitsandbytes NF4 with double-quantized absmax scales"

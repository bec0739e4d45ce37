"""native: quantbridge's packed INT4 (canonical Int4Weight, round-to-nearest quantization)."""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.backend import Backend, QuantLinear, register
from quantbridge.kernels import int4_reference
from quantbridge.packed import Int4Weight, quantize_rtn
from quantbridge.spec import QuantSpec


class NativeLinear(QuantLinear):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(weight.in_features, weight.out_features)
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("perm", weight.perm)
        self.group_size = weight.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = int4_reference.KERNEL_NAME

    @property
    def packed(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    @property
    def weight_nbytes(self) -> int:
        return self.packed.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_reference.int4_linear(x, self.packed, self.bias)


@register
class NativeBackend(Backend):
    name = "native"
    description = "quantbridge packed INT4, round-to-nearest, group-wise asymmetric or symmetric"

    def quantize(self, linear: nn.Linear, spec: QuantSpec, calib: torch.Tensor | None = None) -> QuantLinear:
        w = quantize_rtn(linear.weight.detach(), spec, scale_dtype=linear.weight.dtype)
        return NativeLinear(w, linear.bias)

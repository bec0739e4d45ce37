"""fp16: the unquantized reference, run through torch's own linear in the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbridge.plugin.backend import Fused, register
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.spec import QuantSpec


class ReferenceLinear(QuantLinear):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features)
        # Shares the reference model's tensors: the reference row costs no extra memory.
        self.weight = linear.weight
        self.bias = linear.bias
        lib = "cublas" if linear.weight.is_cuda else "cpu"
        self.kernel = f"torch.linear[{lib},{str(linear.weight.dtype).removeprefix('torch.')}]"

    @property
    def weight_nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dequantize(self) -> torch.Tensor:
        return self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@register
class FP16Backend(Fused):
    name = "fp16"
    description = "unquantized reference in the compute dtype (bf16/fp16 on GPU, fp32 on CPU)"
    quantized = False
    reference = True

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        return ReferenceLinear(linear)

"""A layer for weights a library quantized but has no kernel for here: reference matmul.

The library's own layout is checked on the way in (the weight is encoded to it and decoded
back, which the codec tests prove lossless), `weight_nbytes` is what that layout stores,
and forward runs the reference kernel on the canonical form, decoded once.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.backend import QuantLinear
from quantbridge.formats import Codec
from quantbridge.kernels import int4_reference
from quantbridge.packed import Int4Weight


class FormatLinear(QuantLinear):
    kernel = int4_reference.KERNEL_NAME

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, codec: Codec, qcfg: dict) -> None:
        super().__init__(weight.in_features, weight.out_features)
        stored = codec.encode(weight)
        self.format = codec.name
        self._nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        w = codec.decode(stored, qcfg)
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self.register_buffer("perm", w.perm)
        self.group_size = w.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm)

    @property
    def weight_nbytes(self) -> int:
        return self._nbytes

    def dequantize(self) -> torch.Tensor:
        return self.int4().dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_reference.int4_linear(x, self.int4(), self.bias)

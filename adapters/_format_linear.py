"""A layer for weights a library quantized but has no kernel for here: reference matmul.

The library's own layout is checked on the way in (the weight is encoded to it and decoded
back, which the codec tests prove lossless), `weight_nbytes` is what that layout stores,
and forward runs the reference kernel on the canonical form, decoded once.
"""

from __future__ import annotations

import torch

from quantbridge.adapters.native import NativeLinear
from quantbridge.formats import Codec
from quantbridge.kernels import int4_reference
from quantbridge.plugin.packed import Int4Weight


class FormatLinear(NativeLinear):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, codec: Codec, qcfg: dict) -> None:
        stored = codec.encode(weight)
        # The reference kernel, never ours: this row is the library's weights.
        super().__init__(codec.decode(stored, qcfg), bias, int4_reference)
        self.format = codec.name
        self._nbytes = sum(t.numel() * t.element_size() for t in stored.values())

    @property
    def weight_nbytes(self) -> int:
        return self._nbytes

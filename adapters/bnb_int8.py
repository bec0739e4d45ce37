"""bnb-int8: bitsandbytes' LLM.int8() Linear8bitLt, the INT8 option a mixed-precision plan can use.

Weights are INT8 with one absmax scale per output row (the spec's bits and group size do
not apply: this backend is always 8-bit, per row). Activation columns above the outlier
threshold (6.0, bitsandbytes' and transformers' default) run in 16/32-bit, the rest in INT8.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.adapters.bnb import _BnbBackend, import_bnb
from quantbridge.plugin.backend import register
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.spec import QuantSpec

OUTLIER_THRESHOLD = 6.0


class BnbInt8Linear(QuantLinear):
    def __init__(self, linear: nn.Linear) -> None:
        bnb = import_bnb()

        super().__init__(linear.in_features, linear.out_features)
        dev = linear.weight.device
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=OUTLIER_THRESHOLD)
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", copy=True), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.layer = layer.to(dev)  # bitsandbytes quantizes on this move
        w = self.layer.weight
        if w.dtype != torch.int8 or w.SCB is None:
            raise RuntimeError("bitsandbytes did not quantize the weight to INT8 on .to(device)")
        # The first forward moves the row scales from the weight into the layer's state: keep them.
        self._scb = w.SCB
        self._nbytes = w.numel() * w.element_size() + w.SCB.numel() * w.SCB.element_size()
        self.kernel = f"bitsandbytes.int8_linear_matmul[{dev.type}]"

    @property
    def weight_nbytes(self) -> int:
        return self._nbytes

    def dequantize(self) -> torch.Tensor:
        return self.layer.weight.data.float() * (self._scb.float().unsqueeze(1) / 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@register
class BnbInt8(_BnbBackend):
    name = "bnb-int8"
    algorithm = "absmax per row, INT8"
    description = "bitsandbytes LLM.int8() (INT8 weights, absmax per row, fp outlier columns)"

    def check_spec(self, spec: QuantSpec) -> None:
        """Always INT8 per row: the INT4 spec's group size does not constrain it."""

    def quantize(self, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        return BnbInt8Linear(linear)

"""Run a weight that carries AWQ-style smoothing factors through any INT4 kernel.

AWQ multiplies input channels of a layer by c (and, for layers that feed another, output
rows by 1/r) and folds the inverse into the neighbouring layers. To swap one layer in an
otherwise unchanged model, quantbridge keeps the factors beside the layer instead:
y = kernel(x / c) / r + bias. That costs up to two elementwise kernels (three with a bias), reported
in `kernel`.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.plugin.layer import QuantLinear


class SmoothedLinear(QuantLinear):
    def __init__(self, inner: QuantLinear, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__(inner.in_features, inner.out_features)
        self.inner = inner
        self.register_buffer("in_scale", None if in_scale is None else in_scale.float())
        self.register_buffer("out_scale", None if out_scale is None else out_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = f"{inner.kernel}+unfolded-smoothing"

    @property
    def weight_nbytes(self) -> int:
        # The factors live in the norms/previous layers of a deployed AWQ model: not counted.
        return self.inner.weight_nbytes

    def dequantize(self) -> torch.Tensor:
        w = self.inner.dequantize()
        if self.in_scale is not None:
            w = w / self.in_scale.float()
        if self.out_scale is not None:
            w = w / self.out_scale.float().unsqueeze(1)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = _divide(x, self.in_scale)
        y = self.inner(x)
        if self.out_scale is not None:
            y = _divide(y, self.out_scale)
        return y if self.bias is None else y + self.bias


def _divide(t: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """t / factors in fp32 (rounding the factors to bf16 would add ~0.4 % weight error), rounded
    once to t's dtype: one kernel where no gradient is wanted (out= takes none), else two."""
    if torch.is_grad_enabled() and t.requires_grad:
        return (t / factors).to(t.dtype)
    return torch.div(t, factors, out=torch.empty_like(t))


def build(make, weight, bias: torch.Tensor | None) -> QuantLinear:
    """make(weight, bias) -> QuantLinear (a backend's from_int4, a kernel's build) for any weight,
    smoothed or not."""
    if not weight.smoothed:
        return make(weight, bias)
    return SmoothedLinear(make(weight.plain(), None), weight.in_scale, weight.out_scale, bias)

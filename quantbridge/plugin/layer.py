"""`QuantLinear`: a linear layer as a backend or kernel stores and runs it."""

from __future__ import annotations

import torch
from torch import nn


class QuantLinear(nn.Module):
    """A linear layer as one backend stores and runs it.

    `kernel` names the code that really runs in forward (e.g. "reference-torch"), so a
    fallback is never reported as a library's kernel.
    """

    kernel: str = "unknown"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight_nbytes(self) -> int:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The [N, K] weight this layer effectively multiplies by, in float32."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by module path, in execution-ish (definition) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

"""Linears as opaque ops for torch.compile: the kernel runs as it does eagerly.

Engines compile the model around their quantized kernels, which stay custom ops (vLLM's
quantization kernels are). Dynamo cannot trace a raw Triton launch or a library's C call,
so compile mode swaps every probed linear for a wrapper whose forward is the custom op
`quantbridge::opaque_linear`, dispatching by index to the layer it wraps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_LAYERS: list[nn.Module | None] = []  # this process's wrapped layers, by index; an index is never reused


@torch.library.custom_op("quantbridge::opaque_linear", mutates_args=())
def _opaque_linear(x: torch.Tensor, index: int) -> torch.Tensor:
    return _LAYERS[index](x)


@_opaque_linear.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _LAYERS[index].out_features)


class OpaqueLinear(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_features = inner.out_features
        _LAYERS.append(inner)
        self.index = len(_LAYERS) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantbridge.opaque_linear(x, self.index)


@contextmanager
def opaque_linears(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, each of `layers` (module path -> module of `model`) is an opaque op."""
    start = len(_LAYERS)
    for name, mod in layers.items():
        model.set_submodule(name, OpaqueLinear(mod))
    try:
        yield
    finally:
        for name, mod in layers.items():
            model.set_submodule(name, mod)
        # Cleared, not deleted: compiled code from this block holds these indices, and a later
        # row must never dispatch to them.
        for i in range(start, len(_LAYERS)):
            _LAYERS[i] = None

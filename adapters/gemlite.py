"""gemlite: Mobius Labs' Triton kernels for group-wise low-bit weights, fp16/bf16, CUDA.

Any asymmetric group-wise INT4 weight runs through it (RTN, GPTQ, AWQ codes alike): the
layer is built by gemlite's own `helper.A16Wn().from_weights(codes, scales, zeros)`, which
packs the codes 8 to an int32 along K and, in its default fma mode, stores the zero-point
as -zero * scale in the activation dtype (rounded: part of the error this row shows).
gemlite picks GEMV, GEMV split-K, GEMM split-K or GEMM by M and autotunes each on first
use (its shipped tuning is for named GPUs, e.g. the H100). Importing gemlite reads the GPU's
name, so it is imported only when a layer is built, on CUDA.
"""

from __future__ import annotations

from importlib.util import find_spec

import torch

from quantbridge.plugin.availability import Availability, dist_version, pip_extra
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight, unpermute_columns

INSTALL_HINT = pip_extra("gemlite")
DTYPES = (torch.float16, torch.bfloat16)


def _version() -> str | None:
    return dist_version("gemlite")


class GemliteLinear(QuantLinear):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        from gemlite.helper import A16Wn

        super().__init__(weight.in_features, weight.out_features)
        dev, dtype = weight.qweight.device, weight.scales.dtype
        self.layer = A16Wn(device=dev, dtype=dtype).from_weights(
            weight.codes(), weight.scales, weight.zeros, W_nbits=4, group_size=weight.group_size,
            bias=None if bias is None else bias.detach())
        self.register_buffer("perm", weight.perm)  # act-order: x is gathered into storage order
        self.group_size = weight.group_size
        self.kernel = f"gemlite {_version()} triton" + ("+act-order-gather" if weight.perm is not None else "")

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.layer.W_q, self.layer.scales, self.layer.zeros, self.perm)
                   if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The weight from gemlite's stored tensors: codes * scale + (-zero * scale), as its kernels do."""
        words = self.layer.W_q.detach().t().to(torch.int32)  # [N, K/8]; code j of a word at bits 4j
        if words.shape != (self.out_features, self.in_features // 8) or self.layer.elements_per_sample != 8:
            raise RuntimeError(f"unexpected gemlite packing {tuple(self.layer.W_q.shape)}")
        shifts = torch.arange(8, device=words.device, dtype=torch.int32) * 4
        codes = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(self.out_features, self.in_features).float()
        g = self.group_size
        s = self.layer.scales.detach().t().float().repeat_interleave(g, dim=1)  # stored [K/g, N]
        z = self.layer.zeros.detach().t().float().repeat_interleave(g, dim=1)
        return unpermute_columns((codes * s + z).cpu(), self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.layer(x)


@register_kernel
class GemliteKernel(Kernel):
    name = "gemlite"
    activation_dtypes = DTYPES
    layouts = ("gptq", "awq")
    description = "gemlite's Triton GEMV/GEMM kernels for any asymmetric group-wise INT4, fp16/bf16, CUDA"
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        v = _version()
        if v is None or find_spec("gemlite") is None:
            return Availability(False, "gemlite is not installed (0.6, pure Triton)")
        if device.type != "cuda":
            return Availability(False, f"gemlite {v} runs on CUDA only (it reads the GPU's name when imported)")
        return Availability(True, f"gemlite {v}")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if not (ok := self.dtype_check(dtype)).ok:
            return ok
        if weight.in_features % 32:
            return Availability(False, f"in_features {weight.in_features} not divisible by 32")
        if weight.group_size < 16:
            return Availability(False, f"group size {weight.group_size} below gemlite's 16")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return GemliteLinear(weight, bias)

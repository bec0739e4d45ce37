"""tinygemm: torch's built-in INT4 kernel (aten._weight_int4pack_mm), CUDA and bf16 only.

It takes our round-to-nearest weights, re-packed into tinygemm's tiled layout; its
zero-point is a float offset: w = (q - 8) * s + zero, so zero = (8 - z) * s, and for weights
with float offsets (GGUF Q4_1/Q4_K, w = q * s + m) zero = m + 8 * s. Both are rounded to bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.plugin.availability import Availability
from quantbridge.plugin.backend import Pairing, register
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight, unpermute_columns
from quantbridge.plugin.spec import QuantSpec

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8  # K must be a multiple of INNER_K_TILES * 16


def to_tinygemm(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical Int4Weight -> (tinygemm packed weight, scales-and-zeros [K/g, N, 2] bf16)."""
    q = w.codes()
    packed = (q[:, 0::2] << 4) | q[:, 1::2]  # tinygemm's input: high nibble = even column
    packed = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), INNER_K_TILES)
    s = w.scales.to(torch.float32)
    zero = (8 - w.zeros.to(torch.float32)) * s if w.offsets is None else w.offsets.to(torch.float32) + 8 * s
    sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


class TinygemmLinear(QuantLinear):
    kernel = "torch.aten._weight_int4pack_mm"

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(w.in_features, w.out_features)
        packed, sz = to_tinygemm(w)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("perm", w.perm)
        self.group_size = w.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._canonical = w.to("cpu")  # for dequantize() only; the kernel never reads it

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def dequantize(self) -> torch.Tensor:
        # tinygemm's float zero-point is rounded to bf16, so compute it as the kernel sees it.
        w = self._canonical
        sz = self.scales_and_zeros.float().cpu()
        s = sz[..., 0].T.repeat_interleave(w.group_size, dim=1)
        zero = sz[..., 1].T.repeat_interleave(w.group_size, dim=1)
        return unpermute_columns((w.codes().float() - 8) * s + zero, w.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@register_kernel
class TinygemmKernel(Kernel):
    name = "tinygemm"
    activation_dtypes = (torch.bfloat16,)
    layouts = ("gguf",)
    description = "torch's tinygemm INT4 kernel (aten._weight_int4pack_mm), bf16 activations"
    takes_offsets = True  # its zero-point is a float already

    def available(self, device: torch.device) -> Availability:
        if device.type != "cuda":
            return Availability(False, "torch's tinygemm kernel runs on CUDA only")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return Availability(False, f"torch {torch.__version__} has no aten._weight_int4pack_mm")
        return Availability(True, f"torch {torch.__version__}")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if not (ok := self.dtype_check(dtype)).ok:
            return ok
        if weight.group_size not in GROUP_SIZES:
            return Availability(False, f"group size {weight.group_size} not in {GROUP_SIZES}")
        if weight.in_features % (INNER_K_TILES * 16):
            return Availability(False, f"in_features {weight.in_features} not divisible by {INNER_K_TILES * 16}")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return TinygemmLinear(weight, bias)


@register
class TinygemmBackend(Pairing):
    name = "tinygemm"
    description = "quantbridge RTN weights through torch's tinygemm INT4 kernel"
    quantizer = "rtn"
    pinned = ("tinygemm",)  # this backend is the kernel: rtn weights through tinygemm only

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.group_size not in GROUP_SIZES:
            raise UserError(f"tinygemm needs --group-size in {GROUP_SIZES}, not {spec.group_size}")

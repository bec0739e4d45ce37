"""autoawq: AutoAWQ's `WQLinear_GEMM` layer on AWQ GEMM tensors, fp16, CUDA.

The layer is AutoAWQ's own module with the tensors an AWQ GEMM checkpoint stores (qweight and
qzeros packed 8 along N in the [0,2,4,6,1,3,5,7] interleave, fp16 scales). Its forward runs
AutoAWQ's CUDA extension (`awq_ext`, from autoawq-kernels) when that is installed, else its
Triton GEMM (`awq_gemm_triton`); above its own size heuristic it dequantizes and calls
cuBLAS instead. `kernel` names which of the two it has. AutoAWQ always computes in fp16.
AutoAWQ 0.2.9 is its last release (the project is archived); it still imports beside
transformers 5.
"""

from __future__ import annotations

import warnings
from importlib.util import find_spec

import torch

from quantbridge.formats.awq import AWQCodec
from quantbridge.plugin.availability import Availability, dist_version, pip_extra
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

INSTALL_HINT = pip_extra("autoawq")  # autoawq 0.2.9 and the datasets package its import needs
GROUP_SIZES = (32, 64, 128)  # AWQ_TRITON_SUPPORTED_GROUP_SIZES, besides one group per row


def _version() -> str | None:
    return dist_version("autoawq")


def import_gemm():
    """AutoAWQ's GEMM module (importing `awq` prints a deprecation notice, kept out of the output)."""
    with warnings.catch_warnings(record=True):  # recorded, not shown (awq resets the filters itself)
        from awq.modules.linear import gemm
    return gemm


class AutoAWQLinear(QuantLinear):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        gemm = import_gemm()
        super().__init__(weight.in_features, weight.out_features)
        t = AWQCodec().encode(weight)
        layer = gemm.WQLinear_GEMM(4, weight.group_size, weight.in_features, weight.out_features, bias is not None,
                                   dev="meta")
        layer.qweight = t["qweight"].contiguous()
        layer.qzeros = t["qzeros"].contiguous()
        layer.scales = t["scales"].to(torch.float16).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        self.layer = layer
        self.group_size = weight.group_size
        path = "awq_ext gemm_forward_cuda" if gemm.awq_ext is not None else "triton awq_gemm_triton"
        # its own switch: at batch x seq >= 1024 it dequantizes and calls torch.matmul (cuBLAS)
        self.kernel = f"autoawq {_version()} WQLinear_GEMM ({path}; dequantize + matmul from 1024 tokens)"

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.layer.qweight, self.layer.qzeros, self.layer.scales))

    def dequantize(self) -> torch.Tensor:
        """AutoAWQ's own dequantization of its layout (`packing_utils.dequantize_gemm`), [N, K]."""
        from awq.utils.packing_utils import dequantize_gemm

        w = dequantize_gemm(self.layer.qweight.cpu(), self.layer.qzeros.cpu(), self.layer.scales.cpu().float(), 4,
                            self.group_size)
        return w.float().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # AutoAWQ's models always hand it [batch, seq, K], and its choice between GEMM and
        # dequantize + cuBLAS reads batch * seq; a flat [M, K] (bench) is M one-token sequences.
        if x.dim() == 2:
            return self.layer(x.unsqueeze(1)).squeeze(1)
        return self.layer(x)


@register_kernel
class AutoAWQKernel(Kernel):
    name = "autoawq"
    activation_dtypes = (torch.float16,)  # AutoAWQ computes in fp16
    layouts = ("awq",)
    description = "AutoAWQ's WQLinear_GEMM (its CUDA extension or Triton GEMM), fp16 activations, CUDA"
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        v = _version()
        if v is None or find_spec("awq") is None:
            return Availability(False, "autoawq is not installed (0.2.9; it needs the datasets package to import)")
        if device.type != "cuda":
            return Availability(False, f"autoawq {v}'s WQLinear_GEMM runs its CUDA extension or Triton kernel: CUDA only")
        return Availability(True, f"autoawq {v}")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if not (ok := self.dtype_check(dtype)).ok:
            return ok
        if weight.perm is not None:
            return Availability(False, "AWQ's layout has no act-order (g_idx)")
        if weight.group_size not in GROUP_SIZES and weight.group_size != weight.in_features:
            return Availability(False, f"group size {weight.group_size} not in {GROUP_SIZES} or per-channel")
        if weight.out_features % 8:
            return Availability(False, f"out_features {weight.out_features} not divisible by 8")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return AutoAWQLinear(weight, bias)

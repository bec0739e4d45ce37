"""vllm-exllama: vLLM's exllama GPTQ kernel (`gptq_gemm`, exllama path), fp16, CUDA.

As vLLM 0.26's ExllamaLinearKernel prepares a GPTQ weight: codes GPTQ-packed along K in input
order; act-order as the permutation argsort(g_idx), which `gptq_shuffle` applies to the codes
(making each group's rows contiguous) and the kernel to x; fp16 scales [K/g, N]; zero-points as
GPTQ v1 (z - 1; for a symmetric weight the constant 7 vLLM makes). Above 50 rows of x the op
dequantizes into a scratch matrix and calls cuBLAS (its own choice, as in vLLM).

vLLM 0.26's ExllamaLinearKernel takes symmetric (uint4b8) weights only. The op also reads GPTQ
v2 zero-points (`use_v2_format`, the zero-point as stored, 0 included); weights with zero-points
run through that, which the layer's `kernel` names.
"""

from __future__ import annotations

import torch

from quantbridge.adapters import _vllm_ops as vo
from quantbridge.adapters import _vllm_pack as vp
from quantbridge.formats.int32pack import g_idx_from_perm, to_input_order
from quantbridge.plugin.kernel import register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

STEP_K = 32  # the exllama kernel steps through K (and group boundaries) 32 codes at a time


class VllmExllamaLinear(vo.VllmLinear):
    _stored = ("qweight", "qzeros", "scales", "q_perm")

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
        dev = weight.qweight.device
        k = weight.in_features
        self.v2 = vp.weight_type(weight) == "uint4"  # symmetric: v1, as vLLM; zero-points: v2
        if weight.perm is not None:
            g_idx = g_idx_from_perm(weight.perm, k, weight.group_size, dev)
            q_perm = torch.sort(g_idx.long(), stable=True).indices.to(torch.int32)  # vLLM: argsort(g_idx)
        else:
            q_perm = torch.empty(0, dtype=torch.int32, device=dev)
        qweight = vp.pack_rows(to_input_order(weight.codes(), weight.perm))
        vo.op("gptq_shuffle")(qweight, q_perm, 4)  # in place
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", vp.exllama_zeros(weight, self.v2).to(dev))
        self.register_buffer("scales", weight.scales.t().to(torch.float16).contiguous())
        self.register_buffer("q_perm", q_perm)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dev, torch.float16))
        self.kernel = (f"{vo.label()} gptq_gemm (exllama, {'uint4, GPTQ v2 zero-points' if self.v2 else 'uint4b8'}"
                       + (", act-order" if weight.perm is not None else "") + ")")

    def _mm(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        out = vo.op("gptq_gemm")(x, self.qweight, self.qzeros, self.scales, self.q_perm, True, self.v2, 4)
        return self._with_bias(out, bias)


@register_kernel
class VllmExllamaKernel(vo.VllmKernel):
    name = "vllm-exllama"
    activation_dtypes = (torch.float16,)
    layouts = ("gptq",)
    description = "vLLM's exllama GPTQ kernel (gptq_gemm after gptq_shuffle), fp16, CUDA"
    ops = ("gptq_gemm", "gptq_shuffle")

    def rules(self, weight: Int4Weight, dtype: torch.dtype, cap: tuple[int, int] | None) -> list[str]:
        problems = []
        if not (ok := self.dtype_check(dtype)).ok:
            problems.append(ok.reason)
        if cap is not None and cap < (6, 0):
            problems.append(f"needs compute capability 6.0 or newer; this GPU is {cap[0]}.{cap[1]}")
        if vp.vllm_group_size(weight) == -1:
            problems.append("one group per row (channelwise): vLLM's exllama kernel needs a positive group size")
        elif weight.group_size % STEP_K:
            problems.append(f"group size {weight.group_size} not a multiple of {STEP_K}")
        if weight.in_features % STEP_K:
            problems.append(f"in_features {weight.in_features} not divisible by {STEP_K}")
        if weight.out_features % 8:
            problems.append(f"out_features {weight.out_features} not divisible by 8 (zero-points pack 8 per word)")
        return problems

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return VllmExllamaLinear(weight, bias)

"""machete: vLLM's Machete kernel (`machete_mm`, CUTLASS 3 for Hopper), fp16/bf16, compute capability 9.0.

As vLLM 0.26's MacheteLinearKernel prepares a weight: the codes GPTQ-packed along K and laid
out by `machete_prepack_B` for the activation dtype; scales [K/g, N] in that dtype; symmetric
weights as `uint4b8`, others as `uint4` with the group zeros handed over as -z * s (in the
activation dtype, rounded there). Act-order: the codes stay in their stored (grouped) order and
x is gathered into it by `permute_cols` before the product, as vLLM does. The bias is added
after the product (vLLM's `output.add_(bias)`). The kernel picks its own schedule per shape.
"""

from __future__ import annotations

import torch

from quantbridge.adapters import _vllm_ops as vo
from quantbridge.adapters import _vllm_pack as vp
from quantbridge.plugin.kernel import register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

GROUP_SIZES = (-1, 64, 128)  # query_machete_supported_group_sizes for fp16/bf16
BLOCK_K, BLOCK_N = 64, 128  # MACHETE_PREPACKED_BLOCK_SHAPE
DTYPES = (torch.float16, torch.bfloat16)


class MacheteLinear(vo.VllmLinear):
    _stored = ("qweight", "scales", "zeros", "perm")

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
        dev, dtype = weight.qweight.device, weight.scales.dtype
        self.wtype = vp.weight_type(weight)
        self.type_id = vo.type_id(self.wtype)
        self.group = vp.vllm_group_size(weight)
        rows = vp.pack_rows(weight.codes())  # stored (act-order: grouped) column order
        # machete_prepack_B takes the [K/8, N] words column-major, as vLLM hands them over
        self.register_buffer("qweight", vo.op("machete_prepack_B")(rows.t().contiguous().t(), dtype, self.type_id, dtype))
        scales = weight.scales.t().to(dtype).contiguous()  # [K/g, N]
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", None if self.wtype == "uint4b8"
                             else vp.machete_zero_term(weight.zeros.t().to(dev), scales))
        self.register_buffer("perm", None if weight.perm is None else weight.perm.to(dev, torch.int32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dev, dtype))
        self.kernel = (f"{vo.label()} machete_mm ({self.wtype}" + (", act-order via permute_cols" if self.perm is not None
                                                                  else "") + ")")

    def _mm(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        if self.perm is not None:
            x = vo.op("permute_cols")(x, self.perm)
        out = vo.op("machete_mm")(x, self.qweight, self.type_id, None, self.scales, self.zeros, self.group,
                                  None, None, None)
        return self._with_bias(out, bias)


@register_kernel
class MacheteKernel(vo.VllmKernel):
    name = "machete"
    activation_dtypes = DTYPES
    layouts = ("gptq", "awq")
    description = "vLLM's Machete kernel (machete_mm after machete_prepack_B), fp16/bf16, Hopper (compute capability 9.0)"
    ops = ("machete_mm", "machete_prepack_B", "permute_cols")

    def rules(self, weight: Int4Weight, dtype: torch.dtype, cap: tuple[int, int] | None) -> list[str]:
        problems = []
        if not (ok := self.dtype_check(dtype)).ok:
            problems.append(ok.reason)
        if cap is not None and cap != (9, 0):
            problems.append(f"Machete needs compute capability 9.0 (Hopper); this GPU is {cap[0]}.{cap[1]}")
        if vp.vllm_group_size(weight) not in GROUP_SIZES:
            problems.append(f"group size {weight.group_size} is not one of Machete's (64, 128, or one per row)")
        if weight.in_features % BLOCK_K:
            problems.append(f"in_features {weight.in_features} not divisible by {BLOCK_K}")
        if weight.out_features % BLOCK_N:
            problems.append(f"out_features {weight.out_features} not divisible by {BLOCK_N}")
        if weight.perm is not None and weight.in_features % 8:
            problems.append("act-order needs in_features divisible by 8 (permute_cols)")
        return problems

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return MacheteLinear(weight, bias)

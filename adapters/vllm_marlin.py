"""marlin: vLLM's Marlin kernel (`marlin_gemm`) on GPTQ and AWQ weights, fp16/bf16, CUDA (sm75+).

The weight goes through the steps vLLM 0.26's MarlinLinearKernel takes (see _vllm_pack for each
transform), for GPTQ and AWQ checkpoints alike (vLLM 0.26 converts an AWQ checkpoint to GPTQ's
packing first): the codes GPTQ-packed along K and repacked by `gptq_marlin_repack` (act-order:
the group index sorted and its sort indices, which the repack applies to the codes and the
kernel to x); symmetric weights as `uint4b8`, weights with zero-points as `uint4`, their
zero-points in Marlin's order. Scales and bias are permuted into
Marlin's order; the bias is fused into the kernel. The workspace holds one lock per SM.
The kernel runs with vLLM's defaults: fp32 global reduction, no atomic-add reduction, the whole
K on one device (is_k_full).

vLLM zero-pads shapes that fit neither of Marlin's tile families; this adapter does not, and
says so in can_implement.
"""

from __future__ import annotations

import math

import torch

from quantbridge.adapters import _vllm_ops as vo
from quantbridge.adapters import _vllm_pack as vp
from quantbridge.formats.int32pack import g_idx_from_perm, to_input_order
from quantbridge.plugin.kernel import register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

GROUP_SIZES = (-1, 32, 64, 128)  # MARLIN_SUPPORTED_GROUP_SIZES
MIN_THREAD_N, MIN_THREAD_K = 64, 128  # GPTQ_MARLIN_MIN_THREAD_N / _K
DTYPES = (torch.float16, torch.bfloat16)


class MarlinLinear(vo.VllmLinear):
    _stored = ("qweight", "scales", "zeros", "g_idx", "sort_idx")

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
        dev, dtype = weight.qweight.device, weight.scales.dtype
        n, k = weight.out_features, weight.in_features
        self.wtype = vp.weight_type(weight)
        group = vp.vllm_group_size(weight)
        empty = torch.empty(0, dtype=torch.int32, device=dev)
        if weight.perm is not None:  # act-order: codes in input order, g_idx sorted as vLLM does
            g_idx, sort_idx = vp.marlin_sort_g_idx(g_idx_from_perm(weight.perm, k, weight.group_size, dev))
            codes = to_input_order(weight.codes(), weight.perm)
        else:
            g_idx, sort_idx, codes = empty, empty, weight.codes()
        qweight = vo.op("gptq_marlin_repack")(vp.pack_rows(codes), sort_idx, k, n, 4, False)
        zeros = empty if self.wtype == "uint4b8" else vp.marlin_zero_points(weight.zeros.t(), n)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", vp.marlin_permute_scales(weight.scales.t().to(dtype), k, n, group))
        self.register_buffer("zeros", zeros)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("sort_idx", sort_idx)
        self.register_buffer("bias", None if bias is None else vp.marlin_permute_bias(bias.detach().to(dev, dtype)))
        self.register_buffer("workspace", torch.zeros(vo.sm_count(dev), dtype=torch.int32, device=dev))
        self.type_id = vo.type_id(self.wtype)
        self.kernel = (f"{vo.label()} marlin_gemm ({self.wtype}"
                       + (", act-order" if weight.perm is not None else "") + ")")

    def _mm(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return vo.op("marlin_gemm")(
            x, None, self.qweight, self.bias if bias else None, self.scales, None, None, self.zeros, self.g_idx,
            self.sort_idx, self.workspace, self.type_id, x.shape[0], self.out_features, self.in_features,
            True, False, True, False)  # is_k_full, use_atomic_add, use_fp32_reduce, is_zp_float


def tile_problem(n: int, k: int, group: int, act_order: bool) -> str | None:
    """Marlin's tile shapes without padding: (N % 64, K % 128), or (N % 128, K % 64) where vLLM's
    marlin_padded_nk would need no padding; act-order only the first (vLLM's strict check)."""
    g = group if group > 0 else 1
    if act_order:
        if n % MIN_THREAD_N or k % MIN_THREAD_K:
            return (f"act-order needs out_features % {MIN_THREAD_N} and in_features % {MIN_THREAD_K} "
                    f"(vLLM's check for act-order), not {n}x{k}")
        return None
    if (n % 64 == 0 and k % math.lcm(128, g) == 0) or (n % 128 == 0 and k % math.lcm(64, g) == 0):
        return None
    return (f"out_features x in_features {n}x{k} fits neither Marlin tile (N % 64 with K % 128, or N % 128 with "
            "K % 64); vLLM zero-pads such shapes, this adapter does not")


@register_kernel
class MarlinKernel(vo.VllmKernel):
    name = "marlin"
    activation_dtypes = DTYPES
    layouts = ("gptq", "awq")
    description = "vLLM's Marlin kernel (marlin_gemm after gptq_marlin_repack), fp16/bf16, CUDA sm75+"
    ops = ("marlin_gemm", "gptq_marlin_repack")

    def rules(self, weight: Int4Weight, dtype: torch.dtype, cap: tuple[int, int] | None) -> list[str]:
        problems = []
        if not (ok := self.dtype_check(dtype)).ok:
            problems.append(ok.reason)
        if cap is not None and cap < (7, 5):
            problems.append(f"Marlin needs compute capability 7.5 or newer; this GPU is {cap[0]}.{cap[1]}")
        if cap == (7, 5) and dtype != torch.float16:
            problems.append("on compute capability 7.5 Marlin takes fp16 activations only")
        group = vp.vllm_group_size(weight)
        if group not in GROUP_SIZES:
            problems.append(f"group size {weight.group_size} is not one of Marlin's (32, 64, 128, or one per row)")
        wtype = vp.weight_type(weight)
        if weight.perm is not None and wtype == "uint4":
            problems.append("act-order with zero-points: Marlin builds act-order kernels for uint4b8 (symmetric) "
                            "only (use --symmetric)")
        shape = tile_problem(weight.out_features, weight.in_features, group, weight.perm is not None)
        if shape:
            problems.append(shape)
        return problems

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return MarlinLinear(weight, bias)

"""The weight transforms vLLM applies before its INT4 kernels run, written in torch from the
canonical Int4Weight (no vLLM import, no CUDA: each is tested on the CPU).

What each kernel is handed, as vLLM 0.26's `MPLinearKernel.process_weights_after_loading` makes
it (vllm/model_executor/kernels/linear/mixed_precision/{marlin,machete,exllama}.py and
quantization/utils/marlin_utils.py):

- weight type: a weight whose every zero-point is 8 is `uint4b8` (codes 0..15 with a fixed bias
  of 8: w = (q - 8) * s, GPTQ's symmetric type; no zero-point tensor); any other is `uint4` with a
  zero-point per group (AWQ's, compressed-tensors' asymmetric type). The codes are the same
  nibbles either way.
- GPTQ row packing: 8 codes along K per int32, nibble i = row 8j + i ([K/8, N]): what
  `gptq_marlin_repack`, `machete_prepack_B` and `gptq_gemm` take.
- Marlin: scales permuted within each run of 64 columns (`scale_perm`), or of 32 for a single
  group per row (`scale_perm_single`); the bias by the single permutation; zero-points by
  `scale_perm`, then each 8 interleaved as 0,2,4,6,1,3,5,7 and packed 8 per int32 along N;
  act-order as the group index sorted, with the sort indices the kernel gathers x by.
- Machete: zero-points handed over as -z * s in the activation dtype (added to q * s).
- exllama (`gptq_gemm`): zero-points packed 8 per int32 along N, as GPTQ v1 (z - 1; for
  uint4b8 the constant bias - 1 = 7) or as v2 (z itself, `use_v2_format`).
"""

from __future__ import annotations

import torch

from quantbridge.formats.int32pack import pack_nibbles, unpack_nibbles
from quantbridge.plugin.packed import Int4Weight

SYMMETRIC_ZERO = 8  # uint4b8's bias
MARLIN_ZP_INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)


def weight_type(w: Int4Weight) -> str:
    """vLLM's scalar type for these codes: "uint4b8" when every zero-point is 8, else "uint4"."""
    return "uint4b8" if bool((w.zeros == SYMMETRIC_ZERO).all()) else "uint4"


def vllm_group_size(w: Int4Weight) -> int:
    """The group size as vLLM states it: -1 for one group per row (channelwise)."""
    return -1 if w.group_size == w.in_features else w.group_size


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [K/8, N]: word [j, n] holds rows 8j..8j+7 of column n, row 8j+i
    in nibble i (GPTQ's qweight; vLLM's pack_quantized_values_into_int32 along dim 0)."""
    n, k = codes.shape
    return pack_nibbles(codes.t().reshape(k // 8, 8, n).permute(0, 2, 1).reshape(k // 8, 8 * n)).contiguous()


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """int [R, N] in 0..15 -> int32 [R, N/8]: 8 along N per word, column 8j+i in nibble i."""
    return pack_nibbles(values.to(torch.uint8))


def unpack_cols(words: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_cols, as int32 [R, N]."""
    return unpack_nibbles(words).to(torch.int32)


def scale_perms() -> tuple[list[int], list[int]]:
    """Marlin's two column permutations: within 64 columns (several groups per row) and within 32
    (one group per row, and the bias)."""
    perm = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, single


def marlin_permute_scales(s: torch.Tensor, size_k: int, size_n: int, group_size: int) -> torch.Tensor:
    """[groups, N] scales in Marlin's order (group_size as vLLM states it, -1 for channelwise)."""
    perm, single = scale_perms()
    p = perm if group_size != -1 and group_size < size_k else single
    return s.reshape(-1, len(p))[:, p].reshape(-1, size_n).contiguous()


def marlin_permute_bias(b: torch.Tensor) -> torch.Tensor:
    _, single = scale_perms()
    return b.reshape(-1, len(single))[:, single].reshape(b.shape).contiguous()


def marlin_zero_points(zp: torch.Tensor, size_n: int) -> torch.Tensor:
    """[groups, N] integer zero-points -> int32 [groups, N/8] as Marlin reads them."""
    perm, _ = scale_perms()
    z = zp.to(torch.int32).reshape(-1, len(perm))[:, perm]
    z = z.reshape(-1, 8)[:, list(MARLIN_ZP_INTERLEAVE)].reshape(-1, size_n)
    return pack_cols(z)


def marlin_sort_g_idx(g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_idx sorted, the int32 sort indices): the columns grouped by group, the order Marlin's
    act-order kernel gathers x in. Stable, so for a canonical weight the indices are its perm."""
    order = torch.sort(g_idx.to(torch.int64), stable=True).indices.to(torch.int32)
    return g_idx[order.long()].contiguous(), order.contiguous()


def machete_zero_term(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[groups, N] zero-points and scales (activation dtype) -> -z * s in that dtype, rounded
    there, as vLLM hands Machete its group zeros."""
    return (-1.0 * scales * zeros.to(scales.dtype)).contiguous()


def exllama_zeros(w: Int4Weight, v2: bool) -> torch.Tensor:
    """gptq_gemm's qzeros: int32 [groups, N/8]. v1 stores z - 1 (what the kernel adds 1 back to;
    cannot hold z = 0), v2 stores z."""
    z = w.zeros.to(torch.int16).t().contiguous()  # canonical [N, groups] -> [groups, N]
    if not v2:
        if bool((z == 0).any()):
            raise ValueError("GPTQ v1 zero-points (z - 1) cannot hold a zero-point of 0")
        z = z - 1
    return pack_cols(z)


def dequantize_uint4b8(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 [N, K] from codes [N, K] read as uint4b8 (w = (q - 8) * s): the symmetric type's own
    reading, which for a weight whose zero-points are all 8 is the canonical one."""
    s = scales.double().repeat_interleave(group_size, dim=1)
    return (codes.double() - SYMMETRIC_ZERO) * s

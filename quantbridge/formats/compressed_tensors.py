"""compressed-tensors `pack-quantized` (llm-compressor's output, read by vLLM).

  weight_packed      int32 [N, K/8]        8 codes along K per word (code = signed value + 8)
  weight_scale             [N, K/g]
  weight_zero_point  int32 [N/8, K/g]      asymmetric only; packed along N (dim 0)
  weight_g_idx       int32 [K]             act-order ("actorder": "group") only
  weight_shape       int64 [2]             [N, K]
Symmetric weights carry no zero-point: signed value 0 is code 8, the canonical z = 8.
Checkpoints with weight_g_idx ("actorder": "group") are read, but not written: compressed-tensors
0.19 and vLLM 0.32 refuse them ("actorder='group' has been removed"), so act-order weights go to
GPTQ or native instead.
"""

from __future__ import annotations

import torch

from quantbridge.formats import Codec, register, require_integer_zeros
from quantbridge.formats.int32pack import (check_canonical_perm, g_idx_from_perm, pack_nibbles, perm_from_g_idx,
                                           to_input_order, unpack_nibbles)
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, pack_int4
from quantbridge.plugin.spec import QuantSpec


@register
class CompressedTensorsCodec(Codec):
    name = "compressed-tensors"
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

    def encode(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        require_integer_zeros(w, "compressed-tensors")
        n, k = w.out_features, w.in_features
        check_canonical_perm(w.perm, w.group_size)
        out = {
            "weight_packed": pack_nibbles(to_input_order(w.codes(), w.perm)),
            "weight_scale": w.scales.contiguous(),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if bool((w.zeros != 8).any()):
            out["weight_zero_point"] = pack_nibbles(w.zeros.t().contiguous()).t().contiguous()
        if w.perm is not None:
            out["weight_g_idx"] = g_idx_from_perm(w.perm, k, w.group_size, w.qweight.device)
        return out

    def decode(self, t: dict[str, torch.Tensor], qcfg: dict) -> Int4Weight:
        n, k = (int(v) for v in t["weight_shape"].tolist())
        codes = unpack_nibbles(t["weight_packed"])[:, :k]
        scales = t["weight_scale"]
        g = k // scales.shape[1]
        if "weight_zero_point" in t:
            zeros = unpack_nibbles(t["weight_zero_point"].t().contiguous()).t()[:n].contiguous()
        else:
            zeros = torch.full(scales.shape, 8, dtype=torch.uint8, device=scales.device)
        perm = perm_from_g_idx(t["weight_g_idx"], g) if "weight_g_idx" in t else None
        if perm is not None:
            codes = codes[:, perm]
        return Int4Weight(pack_int4(codes), scales, zeros, g, perm)

    def quantization_config(self, spec: QuantSpec, skipped: list[str]) -> dict:
        weights = {"num_bits": 4, "type": "int", "symmetric": spec.symmetric, "dynamic": False,
                   "strategy": "channel" if spec.group_size == -1 else "group",
                   "group_size": None if spec.group_size == -1 else spec.group_size,
                   "actorder": "group" if spec.act_order else None}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": skipped}

    def matches(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "compressed-tensors" and qcfg.get("format") == "pack-quantized"

    def for_checkpoint(self, spec: QuantSpec) -> "CompressedTensorsCodec":
        if spec.act_order:
            raise UserError("act-order (g_idx) weights: compressed-tensors checkpoints no longer hold act-order "
                            "(compressed-tensors 0.19 and vLLM 0.32 refuse actorder 'group'); write --to gptq or "
                            "native, or quantize without --act-order")
        return self

"""AWQ GEMM checkpoints (AutoAWQ / llm-awq `quant_method: awq`, `version: gemm`).

  qweight int32 [K, N/8]   8 codes along N per word, nibble i = column order[i] of the 8
  qzeros  int32 [K/g, N/8] the same packing for zero-points (no offset)
  scales        [K/g, N]
order = [0, 2, 4, 6, 1, 3, 5, 7]: the interleave AWQ's GEMM kernel dequantizes in. AWQ has
no act-order; its activation scales are folded into the preceding layers of the model.
"""

from __future__ import annotations

import torch

from quantbridge.formats import Codec, register, require_integer_zeros
from quantbridge.formats.int32pack import pack_nibbles, unpack_nibbles
from quantbridge.plugin.packed import Int4Weight, pack_int4
from quantbridge.plugin.spec import QuantSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@register
class AWQCodec(Codec):
    name = "awq"
    suffixes = ("qweight", "qzeros", "scales")

    def encode(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        require_integer_zeros(w, "AWQ")
        if w.perm is not None:
            raise ValueError("AWQ checkpoints cannot hold act-order (a column permutation); "
                             "convert to gptq or native instead")
        return {
            "qweight": pack_nibbles(w.codes().t().contiguous(), AWQ_ORDER),
            "qzeros": pack_nibbles(w.zeros.t().contiguous(), AWQ_ORDER),
            "scales": w.scales.t().contiguous(),
        }

    def decode(self, t: dict[str, torch.Tensor], qcfg: dict) -> Int4Weight:
        if qcfg.get("version", "gemm").lower() != "gemm":
            raise ValueError(f"AWQ version {qcfg.get('version')!r} is not supported; quantbridge reads AWQ GEMM checkpoints")
        codes = unpack_nibbles(t["qweight"], AWQ_ORDER).t().contiguous()
        zeros = unpack_nibbles(t["qzeros"], AWQ_ORDER).t().contiguous()
        scales = t["scales"].t().contiguous()
        g = codes.shape[1] // scales.shape[1]
        return Int4Weight(pack_int4(codes), scales, zeros, g, None)

    def quantization_config(self, spec: QuantSpec, skipped: list[str]) -> dict:
        if spec.act_order:
            raise ValueError("AWQ has no act-order; quantize without --act-order")
        return {"quant_method": "awq", "bits": 4, "group_size": spec.group_size, "zero_point": not spec.symmetric,
                "version": "gemm", "modules_to_not_convert": skipped or None}

    def matches(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "awq"

"""quantbridge's own checkpoint layout: the canonical Int4Weight tensors as they are.

It is the one layout that also holds float offsets per group (`offsets`, GGUF Q4_1/Q4_K),
so a GGUF model converts to it without changing a value.
"""

from __future__ import annotations

import torch

from quantbridge.formats import Codec, register
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.spec import QuantSpec

FORMAT_VERSION = 1


@register
class NativeCodec(Codec):
    name = "native"
    suffixes = ("qweight", "scales", "zeros", "perm", "offsets")

    def encode(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        out = {"qweight": w.qweight, "scales": w.scales, "zeros": w.zeros}
        if w.perm is not None:
            out["perm"] = w.perm
        if w.offsets is not None:
            out["offsets"] = w.offsets
        return out

    def decode(self, t: dict[str, torch.Tensor], qcfg: dict) -> Int4Weight:
        g = t["qweight"].shape[1] * 2 // t["scales"].shape[1]
        return Int4Weight(t["qweight"], t["scales"], t["zeros"], g, t.get("perm"), offsets=t.get("offsets"))

    def quantization_config(self, spec: QuantSpec, skipped: list[str]) -> dict:
        return {"quant_method": "quantbridge", "format_version": FORMAT_VERSION, "bits": 4,
                "group_size": spec.group_size, "symmetric": spec.symmetric, "act_order": spec.act_order,
                "backend": "native", "ignore": skipped}

    def matches(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "quantbridge"

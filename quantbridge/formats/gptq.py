"""GPTQ checkpoints (auto-gptq / GPTQModel / transformers `quant_method: gptq`).

  qweight int32 [K/8, N]   8 codes along K per word, input-column order
  qzeros  int32 [K/g, N/8] 8 zero-points along N per word
  scales        [K/g, N]
  g_idx   int32 [K]        group of each input column (act-order when not k // g)
checkpoint_format "gptq" (v1, what most checkpoints and vLLM use) stores zero-point - 1;
"gptq_v2" stores the zero-point itself. v1 cannot store a zero-point of 0 (it wraps to 15).

A checkpoint is written as v1 when it is symmetric (every GPTQ reader takes it) and as v2
when it is asymmetric: GPTQModel loads an asymmetric v1 checkpoint only when its
`meta.quantizer` names GPTQModel >= 0.9.0 as the quantizer (other tools' asymmetric v1
checkpoints predate its fixed asymmetric math), which quantbridge cannot honestly claim; it loads
`gptq_v2` from any producer, as transformers does through it. (vLLM 0.32 refuses asymmetric
GPTQ either way.) docs/backends.md, "What convert writes", has the readers of each.
"""

from __future__ import annotations

import torch

from quantbridge.formats import Codec, register, require_integer_zeros
from quantbridge.formats.int32pack import (check_canonical_perm, g_idx_from_perm, pack_nibbles, perm_from_g_idx,
                                           to_input_order, unpack_nibbles)
from quantbridge.plugin.packed import Int4Weight, pack_int4
from quantbridge.plugin.spec import QuantSpec

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def checkpoint_format(qcfg: dict) -> str:
    """v1 or v2, from `checkpoint_format` (what vLLM reads) or `format` (GPTQModel's and transformers'
    name for it); another layout stored under quant_method gptq (e.g. marlin) is refused, not guessed."""
    named = {k: str(qcfg[k]).lower() for k in ("checkpoint_format", "format") if qcfg.get(k) is not None}
    if len(set(named.values())) > 1:
        raise ValueError(f"checkpoint_format {named['checkpoint_format']!r} and format {named['format']!r} disagree; "
                         "fix the checkpoint's quantization_config")
    fmt = next(iter(named.values()), "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; quantbridge reads gptq (v1) and gptq_v2")
    return fmt


def _zero_offset(qcfg: dict) -> int:
    return 0 if checkpoint_format(qcfg) == "gptq_v2" else 1


@register
class GPTQCodec(Codec):
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, checkpoint_format: str = "gptq") -> None:
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {checkpoint_format!r}: use one of {CHECKPOINT_FORMATS}")
        self.checkpoint_format = checkpoint_format

    def encode(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        require_integer_zeros(w, "GPTQ")
        n, k = w.out_features, w.in_features
        check_canonical_perm(w.perm, w.group_size)
        offset = _zero_offset({"checkpoint_format": self.checkpoint_format})
        if offset and bool((w.zeros == 0).any()):
            raise ValueError("a zero-point of 0 cannot be stored in GPTQ v1 (it wraps to 15); "
                             "write checkpoint_format gptq_v2 or another format")
        codes = to_input_order(w.codes(), w.perm)  # GPTQ keeps input-column order, g_idx says the group
        zeros = (w.zeros.to(torch.int16) - offset).to(torch.uint8)
        return {
            # word [j, n] holds input columns 8j..8j+7 of output n
            "qweight": pack_nibbles(codes.t().reshape(k // 8, 8, n).permute(0, 2, 1).reshape(k // 8, 8 * n)),
            "qzeros": pack_nibbles(zeros.t().contiguous()),
            "scales": w.scales.t().contiguous(),
            "g_idx": g_idx_from_perm(w.perm, k, w.group_size, w.qweight.device),
        }

    def decode(self, t: dict[str, torch.Tensor], qcfg: dict) -> Int4Weight:
        qweight, scales = t["qweight"], t["scales"]
        k8, n = qweight.shape
        k = k8 * 8
        groups = scales.shape[0]
        g = k // groups
        codes = unpack_nibbles(qweight.t().contiguous())  # [N, K]: word j of row n holds k = 8j..8j+7
        zeros = (unpack_nibbles(t["qzeros"])[:, :n].to(torch.int16) + _zero_offset(qcfg)) & 0xF
        g_idx = t.get("g_idx")
        perm = None if g_idx is None else perm_from_g_idx(g_idx, g)
        if perm is not None:
            codes = codes[:, perm]
        return Int4Weight(pack_int4(codes), scales.t().contiguous(), zeros.t().contiguous().to(torch.uint8), g, perm)

    def quantization_config(self, spec: QuantSpec, skipped: list[str]) -> dict:
        # `format` is GPTQModel's and transformers' field, `checkpoint_format` vLLM's: both, always equal.
        return {"quant_method": "gptq", "bits": 4, "group_size": spec.group_size, "desc_act": spec.act_order,
                "sym": spec.symmetric, "checkpoint_format": self.checkpoint_format, "format": self.checkpoint_format,
                "pack_dtype": "int32", "modules_in_block_to_quantize": None, "true_sequential": True}

    def matches(self, qcfg: dict) -> bool:
        return qcfg.get("quant_method") == "gptq"

    def for_checkpoint(self, spec: QuantSpec) -> "GPTQCodec":
        # v1 for symmetric weights (every GPTQ reader), v2 for asymmetric ones (see the module doc).
        return GPTQCodec("gptq" if spec.symmetric else "gptq_v2")

    @property
    def label(self) -> str:
        return f"gptq ({'v2' if self.checkpoint_format == 'gptq_v2' else 'v1'})"

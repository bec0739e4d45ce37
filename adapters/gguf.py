"""gguf: llama.cpp's own INT4 codes, read from the GGUF file the model was loaded from.

For a model that came from a GGUF file (`demo`, which is SmolLM2's Q4_1 GGUF, or any
`.gguf` MODEL), this quantizer chooses no codes: it reads the file's Q4_0/Q4_1/Q4_K tensors
(formats/gguf.py, bit-exact) for the compared layers. The reference model holds those same
weights dequantized, so a `gguf` row's error is its kernel's alone, and its perplexity is
that of the GGUF as shipped. Q4_1 and Q4_K carry a float offset per group, which only the
kernels marked `takes_offsets` run (the Triton kernel and tinygemm on CUDA, the torch reference
everywhere).
A model that did not come from a GGUF file makes the row unavailable, with that reason.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.plugin.backend import Pairing, register
from quantbridge.plugin.errors import NotRunnable
from quantbridge.plugin.packed import Int4Weight, cast_scales
from quantbridge.plugin.quantizer import ModelCodes, Quantizer, register_quantizer


@register_quantizer
class GGUFQuantizer(Quantizer):
    name = "gguf"
    algorithm = "gguf"
    layout = "gguf"
    description = "llama.cpp's own codes (Q4_0/Q4_1/Q4_K) from the GGUF file the model came from"
    reads_model = True  # its codes come from the model's own file, for the whole model at once

    def read(self, codes: ModelCodes | None, linears: dict[str, nn.Linear]) -> dict[str, Int4Weight]:
        if codes is None:
            raise NotRunnable("gguf reads the codes of the GGUF file a model came from; this model did not come "
                              "from one (compare demo, demo-gguf or a .gguf file)")
        missing = [n for n in linears if n not in codes.weights]
        if missing:
            raise NotRunnable(f"{codes.source} has no 4-bit tensor for {missing[0]} "
                              f"({codes.others.get(missing[0], 'absent')}); pass --skip for it")
        out = {}
        for n, lin in linears.items():
            # scales in the compute dtype, as kernels take them (fp16 -> fp32 is exact; -> bf16 rounds),
            # offsets as the file stores them: the kernels that take them convert them themselves
            w = cast_scales(codes.weights[n], lin.weight.dtype).to(lin.weight.device)
            if not torch.equal(w.dequantize(lin.weight.dtype), lin.weight.data):
                raise NotRunnable(f"{n}: the model's weight is not {codes.source}'s {codes.kinds[n]} tensor "
                                  "dequantized (was the model changed after it was loaded?)")
            out[n] = w
        return out


@register
class GGUFBackend(Pairing):
    name = "gguf"
    description = "the GGUF file's own Q4 codes (llama.cpp's quantization) through the best kernel that takes them"
    quantizer = "gguf"

"""gptq: GPTQ (Frantar et al.) through llm-compressor's GPTQModifier, weights in GPTQ layout.

The layer keeps the weights exactly as a GPTQ checkpoint stores them (qweight/qzeros/scales/
g_idx, through quantbridge.formats.gptq). No GPTQ library kernel can run here (see
docs/backends.md), so forward decodes them and runs the reference kernel: `kernel` says
`reference-torch`. `--weights gptq` runs the same weights through every other kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.adapters import _llmcompressor as llmc
from quantbridge.adapters._format_linear import FormatLinear
from quantbridge.formats.gptq import GPTQCodec
from quantbridge.plugin.availability import Availability
from quantbridge.plugin.backend import Pairing, register
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.quantizer import Calibration, Quantizer, register_quantizer
from quantbridge.plugin.spec import QuantSpec


@register_quantizer
class GPTQQuantizer(Quantizer):
    name = "gptq"
    algorithm = "gptq"
    layout = "gptq"
    description = "GPTQ (llm-compressor GPTQModifier, calibrated)"
    install_hint = llmc.INSTALL_HINT
    needs_calibration = True

    def available(self, device: torch.device) -> Availability:
        return llmc.availability(device)

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.act_order:
            raise UserError("llm-compressor 0.14 no longer writes g_idx act-order (desc_act); its GPTQ always "
                            "processes columns in activation order with contiguous groups. Drop --act-order "
                            "(desc_act checkpoints from other tools still load: quantbridge compare CHECKPOINT_DIR)")

    def quantize(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                 calib: Calibration | None) -> dict[str, Int4Weight]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        if calib is None:
            raise ValueError("GPTQ needs calibration data")
        self.check_spec(spec)
        # actorder "weight": columns quantized in activation order, groups stay contiguous, so
        # the stored layout is that of desc_act=False (no g_idx) with most of act-order's gain.
        recipe = GPTQModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": {**llmc.scheme(spec), "actorder": "weight"}}},
            ignore=llmc.ignored(model, linears),
        )
        work = llmc.oneshot(model, linears, calib, recipe)
        return {n: llmc.read_int4(work.get_submodule(n), spec.group_size, lin.weight.dtype)
                for n, lin in linears.items()}


@register_kernel
class GPTQLayoutKernel(Kernel):
    name = "gptq-layout"
    layouts = ("gptq",)
    description = "GPTQ v2 tensors (qweight/qzeros/scales/g_idx) decoded once, torch reference matmul"

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        # In memory the v2 layout: it holds every zero-point (v1 cannot store 0).
        return FormatLinear(weight, bias, GPTQCodec("gptq_v2"), {"checkpoint_format": "gptq_v2"})


@register
class GPTQBackend(Pairing):
    name = "gptq"
    description = "GPTQ weights (llm-compressor) through the best GPTQ kernel here"
    install_hint = llmc.INSTALL_HINT
    quantizer = "gptq"

"""awq: AWQ (Lin et al.) through llm-compressor's AWQModifier + QuantizationModifier, AWQ GEMM layout.

AWQ searches per-channel scales on calibration activations and folds them into the
neighbouring layers (norm weights, the previous linear). quantbridge swaps single layers
into an otherwise unchanged model, so the folded factors are recovered exactly from the
weights (W_awq = diag(r) W diag(c), a rank-1 ratio) and kept beside the layer
(quantbridge.plugin.smoothing). Weights stay in AWQ's GEMM packing; no AWQ library kernel can run
here (docs/backends.md), so forward is the reference kernel and `kernel` says so.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.adapters import _llmcompressor as llmc
from quantbridge.adapters._format_linear import FormatLinear
from quantbridge.formats.awq import AWQCodec
from quantbridge.plugin.availability import Availability, pip_extra
from quantbridge.plugin.backend import Pairing, register
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.quantizer import Calibration, Quantizer, register_quantizer
from quantbridge.plugin.spec import QuantSpec

RANK1_TOLERANCE = 1e-3  # relative residual of W_awq vs diag(r) W diag(c): pure scaling leaves ~1e-6


def unfold_scales(original: torch.Tensor, smoothed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [K], r [N]) with smoothed = diag(r) @ original @ diag(c), fitted in log space."""
    w0, w1 = original.double(), smoothed.double()
    ok = (w0 != 0) & (w1 != 0)
    log_ratio = torch.where(ok, torch.log(w1.abs()) - torch.log(w0.abs()), torch.nan)
    log_r = torch.nanmean(log_ratio, dim=1)
    log_c = torch.nanmean(log_ratio - log_r.unsqueeze(1), dim=0)
    r, c = torch.exp(log_r), torch.exp(log_c)
    residual = torch.linalg.vector_norm(w1 - r.unsqueeze(1) * w0 * c) / torch.linalg.vector_norm(w1)
    if not residual < RANK1_TOLERANCE:
        raise RuntimeError(f"AWQ changed a weight beyond per-channel scaling (residual {residual:.2e})")
    return c.float(), r.float()


@register_quantizer
class AWQQuantizer(Quantizer):
    name = "awq"
    algorithm = "awq"
    layout = "awq"
    description = "AWQ (llm-compressor AWQModifier + QuantizationModifier, calibrated)"
    install_hint = pip_extra("awq")
    needs_calibration = True

    def available(self, device: torch.device) -> Availability:
        return llmc.availability(device)

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.act_order:
            raise UserError("AWQ has no act-order; drop --act-order or leave awq out")

    def _smoothed_model(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                        calib: Calibration | None) -> nn.Module:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        if calib is None:
            raise ValueError("AWQ needs calibration data")
        ignore = llmc.ignored(model, linears)
        recipe = [AWQModifier(),
                  QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": llmc.scheme(spec)}},
                                       ignore=ignore)]
        return llmc.oneshot(model, linears, calib, recipe)

    def export(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
               calib: Calibration | None) -> tuple[nn.Module, dict[str, Int4Weight]]:
        """The AWQ model as a checkpoint holds it: factors folded into norms and previous layers."""
        work = self._smoothed_model(model, linears, spec, calib)
        dtype = next(model.parameters()).dtype
        weights = {n: llmc.read_int4(work.get_submodule(n), spec.group_size, dtype) for n in linears}
        return work.to(dtype), weights

    def quantize(self, model: nn.Module, linears: dict[str, nn.Linear], spec: QuantSpec,
                 calib: Calibration | None) -> dict[str, Int4Weight]:
        work = self._smoothed_model(model, linears, spec, calib)
        out = {}
        for n, lin in linears.items():
            mod = work.get_submodule(n)
            w = llmc.read_int4(mod, spec.group_size, lin.weight.dtype)
            c, r = unfold_scales(lin.weight.detach().float().cpu(), mod.weight.detach().float().cpu())
            dev = lin.weight.device
            w.in_scale = None if torch.allclose(c, torch.ones_like(c), rtol=0, atol=1e-6) else c.to(dev)
            w.out_scale = None if torch.allclose(r, torch.ones_like(r), rtol=0, atol=1e-6) else r.to(dev)
            out[n] = w
        return out


@register_kernel
class AWQLayoutKernel(Kernel):
    name = "awq-layout"
    layouts = ("awq",)
    description = "AWQ GEMM tensors (the [0,2,4,6,1,3,5,7] interleave) decoded once, torch reference matmul"

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if weight.perm is not None:
            return Availability(False, "AWQ's layout has no act-order (g_idx)")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return FormatLinear(weight, bias, AWQCodec(), {"version": "gemm"})


@register
class AWQBackend(Pairing):
    name = "awq"
    description = "AWQ weights (llm-compressor) through the best AWQ kernel here"
    install_hint = pip_extra("awq")
    quantizer = "awq"

"""rtn: round-to-nearest group-wise INT4, quantbridge's own quantizer (no calibration).

Scales are kept in the layer's dtype (the compute dtype), as the kernels read them.
"""

from __future__ import annotations

from torch import nn

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, quantize_rtn
from quantbridge.plugin.quantizer import Quantizer, register_quantizer
from quantbridge.plugin.spec import QuantSpec


@register_quantizer
class RTNQuantizer(Quantizer):
    name = "rtn"
    algorithm = "rtn"
    baseline = True
    description = "round-to-nearest, group-wise, asymmetric or symmetric (quantbridge)"

    def check_spec(self, spec: QuantSpec) -> None:
        if spec.act_order:  # act-order orders GPTQ's error compensation; RTN rounds each weight on its own
            raise UserError("rtn has no act-order (it rounds every weight on its own, so column order changes "
                            "nothing): drop --act-order, or leave the rtn rows (native, tinygemm) out; "
                            "--weights gptq runs GPTQ's act-order weights through their kernels")

    def quantize_layer(self, linear: nn.Linear, spec: QuantSpec) -> Int4Weight:
        return quantize_rtn(linear.weight.detach(), spec, scale_dtype=linear.weight.dtype)

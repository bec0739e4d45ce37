"""bnb-int8 (bitsandbytes LLM.int8()) against a float64 reference."""

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from quantbridge.plugin.backend import get  # noqa: E402
from quantbridge.plugin.spec import QuantSpec  # noqa: E402


@pytest.mark.parametrize("n,k", [(96, 256), (256, 384)])
def test_int8_layer_matches_float64(n, k):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n)
    q = get("bnb-int8").quantize(lin, QuantSpec())
    # Per-row absmax INT8: round-to-nearest is within half a step (absmax / 127) per row;
    # bitsandbytes' own reduced-precision scaling adds a little (measured up to 0.53 step).
    w64 = lin.weight.detach().double()
    step = w64.abs().amax(1, keepdim=True) / 127
    err = (q.dequantize().double() - w64).abs() / step
    assert err.max() < 0.6 and err.mean() < 0.3
    assert q.weight_nbytes == n * k + 4 * n  # int8 codes + one fp32 scale per row
    x = torch.randn(8, k)
    ref = x.double() @ w64.T + lin.bias.detach().double()
    out = q(x).double()
    # INT8 activations and weights: relative L2 error of the output within 2 %.
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert "int8" in q.kernel

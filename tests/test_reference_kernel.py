"""The reference INT4 matmul against a float64 matmul of the dequantized weight."""

import pytest
import torch

from quantbridge.kernels.int4_reference import int4_linear
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec


@pytest.mark.parametrize("m,n,k,gs,sym", [(1, 64, 128, 32, False), (7, 96, 256, 64, True),
                                         (16, 128, 512, 128, False), (3, 48, 384, -1, True)])
def test_reference_matches_float64(m, n, k, gs, sym):
    gen = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    qw = quantize_rtn(w, QuantSpec(group_size=gs, symmetric=sym), scale_dtype=torch.float32)
    ref = x.double() @ qw.dequantize(torch.float64).T + bias.double()
    out = int4_linear(x, qw, bias)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel  # fp32 arithmetic


def test_reference_with_perm_and_bf16():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=gen)
    perm = torch.randperm(256, generator=gen)
    qw = quantize_rtn(w, QuantSpec(group_size=128), scale_dtype=torch.bfloat16, perm=perm)
    x = torch.randn(2, 5, 256, generator=gen)
    ref = x.double() @ qw.dequantize(torch.float64).T
    out = int4_linear(x.bfloat16(), qw)
    assert out.shape == (2, 5, 64) and out.dtype == torch.bfloat16
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel  # bf16 operands

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


class _OperandKernel:
    """A stand-in for the Triton module on a CPU machine: binds every layer, in the operand layout,
    and computes from the codes it was handed (read back through from_operand)."""

    KERNEL_NAME = "stand-in"

    class BoundLinear:
        def __init__(self, w, bias, layout):
            assert layout == "operand"
            self.w, self.bias = w, bias

        def __call__(self, x):
            from dataclasses import replace

            from quantbridge.kernels.int4_layouts import from_operand

            return int4_linear(x, replace(self.w, qweight=from_operand(self.w.qweight)), self.bias)

        def weights_changed(self):
            pass  # it derives nothing from the stored weight

    @staticmethod
    def bound_layout(w):
        return "operand"

    int4_linear = staticmethod(int4_linear)


def test_native_layer_keeps_one_copy_of_its_codes_in_the_kernels_layout(monkeypatch):
    """Bound, a layer stores its codes only in the layout its kernel reads; its weight, dequantize()
    and state dict stay canonical, a state dict loads back into the re-laid buffer, and unbound
    (here: the stand-in refuses to bind) the codes return to canonical."""
    from quantbridge.adapters.native import NativeLinear
    from quantbridge.kernels.int4_layouts import to_operand

    gen = torch.Generator().manual_seed(21)
    qw = quantize_rtn(torch.randn(48, 256, generator=gen), QuantSpec(group_size=128), scale_dtype=torch.float32)
    bias = torch.randn(48, generator=gen)
    binds = [True]
    monkeypatch.setattr(NativeLinear, "_binds", lambda self: binds[0])
    layer = NativeLinear(qw, bias, _OperandKernel)
    assert layer.layout == "operand" and torch.equal(layer.qweight, to_operand(qw.qweight))
    assert torch.equal(layer.packed.qweight, qw.qweight) and layer.weight_nbytes == qw.nbytes
    x = torch.randn(3, 256, generator=gen)
    ref = x.double() @ qw.dequantize(torch.float64).T + bias.double()
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-6
    torch.testing.assert_close(layer.dequantize(), qw.dequantize(torch.float32))
    state = layer.state_dict()
    assert torch.equal(state["qweight"], qw.qweight)
    layer.qweight.zero_()
    layer.load_state_dict(state)
    assert torch.equal(layer.qweight, to_operand(qw.qweight))
    binds[0] = False
    layer._bind()
    assert layer.layout == "canonical" and torch.equal(layer.qweight, qw.qweight) and layer._bound is None

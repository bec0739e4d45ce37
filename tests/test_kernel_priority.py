"""One kernel priority list for the whole program: a kernel is one module plus one line in
plugin.kernel.PRIORITY, and every backend of its layout tries it in that place."""

import importlib
import sys
import textwrap

import pytest
import torch

from quantbridge.plugin import backend as registry
from quantbridge.plugin import kernel as kernels
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec

MODULE = textwrap.dedent('''
    """A kernel from outside quantbridge: dequantize, then F.linear."""
    import torch

    from quantbridge.plugin.kernel import Kernel, register_kernel
    from quantbridge.plugin.layer import QuantLinear


    class DequantLinear(QuantLinear):
        kernel = "test-dequant"

        def __init__(self, weight, bias):
            super().__init__(weight.in_features, weight.out_features)
            self.weight, self.bias = weight, bias

        @property
        def weight_nbytes(self):
            return self.weight.nbytes

        def dequantize(self):
            return self.weight.dequantize(torch.float32)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.dequantize(x.dtype), self.bias)


    @register_kernel
    class DequantKernel(Kernel):
        name = "test-dequant"
        layouts = ("native",)

        def build(self, weight, bias):
            return DequantLinear(weight, bias)
''')


@pytest.fixture
def outside_kernel(tmp_path, monkeypatch):
    (tmp_path / "qb_outside_kernel.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("qb_outside_kernel")  # importing registers it, as an entry point's module does
    yield "test-dequant"
    kernels.KERNELS.classes.pop("test-dequant", None)
    sys.modules.pop("qb_outside_kernel", None)


def test_a_kernel_is_one_module_and_one_line_in_the_priority_list(outside_kernel, monkeypatch):
    native = registry.get("native")
    before = native.kernels
    # Registered but not listed: tried after every listed kernel of its layout.
    assert native.kernels == before and kernels.kernels_for("native")[-1] == outside_kernel
    assert outside_kernel not in registry.get("gptq").kernels  # another layout's backends never try it
    # One line in the list puts it first for every backend of its layout; nothing else changes.
    monkeypatch.setattr(kernels, "PRIORITY", (outside_kernel, *kernels.PRIORITY))
    assert native.kernels == (outside_kernel, *[k for k in before if k != outside_kernel])
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(96, 128, generator=gen, dtype=torch.float64).float() * 0.05
    q = quantize_rtn(w, QuantSpec(group_size=32), scale_dtype=torch.float32)
    layer = native.from_int4(q, None)
    assert layer.kernel == outside_kernel and layer.rejected_kernels == ()
    x = torch.randn(5, 128, generator=gen)
    ref = x.double() @ q.dequantize(torch.float64).T
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-5)  # fp32 matmul of the same weight


def test_priority_list_orders_every_backends_kernels():
    """The built-in backends' kernels are the list's order filtered by layout (or a backend's pin)."""
    order = kernels.kernel_names()
    for name in registry.names():
        b = registry.get(name)
        if isinstance(b, registry.Pairing) and not b.pinned:
            ks = list(b.kernels)
            assert ks == sorted(ks, key=order.index), name

"""Engine kernels (exllamav2, gemlite, AutoAWQ): their reasons, their layouts, their outputs.

On the CPU: each engine says why it cannot run, the chooser records those reasons, the shape
and dtype checks refuse what the engine cannot hold, and AutoAWQ's own dequantization of the
AWQ tensors built for its layer gives back the canonical weight. On a GPU (marked `gpu`):
every engine layer's output on fresh random inputs against the float64 product of the
canonical weight, and its own dequantization against that weight.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest
import torch

from quantbridge.plugin import backend as registry
from quantbridge.plugin.kernel import choose, get_kernel
from quantbridge.plugin.packed import Int4Weight, quantize_rtn
from quantbridge.plugin.spec import QuantSpec

CPU = torch.device("cpu")
ENGINES = ("exllamav2", "gemlite", "autoawq")  # CUDA only
CPU_ENGINES = ("gptqmodel-torch", "gptqmodel-awq-torch")  # GPTQModel's torch layers: any device


def _weight(n: int, k: int, g: int, dtype: torch.dtype, device="cpu", symmetric=False, act_order=False,
            seed: int | None = None) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    w = torch.randn(n, k, generator=gen) * 0.05
    q = quantize_rtn(w.to(dtype), QuantSpec(group_size=g, symmetric=symmetric), scale_dtype=dtype)
    if act_order:  # a real act-order weight: columns stored in a permuted order (each group's ascending)
        perm = torch.randperm(k, generator=gen).view(-1, g).sort(dim=1).values.flatten()
        q = quantize_rtn(w[:, perm].to(dtype), QuantSpec(group_size=g, symmetric=symmetric), scale_dtype=dtype)
        q = Int4Weight(q.qweight, q.scales, q.zeros, q.group_size, perm)
    return q.to(device) if device != "cpu" else q


@pytest.mark.parametrize("name", ENGINES)
def test_engines_say_why_not_on_cpu(name):
    a = get_kernel(name).available(CPU)
    assert not a.ok
    assert ("CUDA" in a.reason) or ("not installed" in a.reason), a.reason


def test_gptq_and_awq_choose_engines_first_and_record_why_not():
    w = _weight(64, 256, 128, torch.float32, seed=1)
    vllm = {"gptq": ("machete", "marlin", "vllm-exllama"), "awq": ("machete", "marlin")}  # tests/test_vllm_kernels.py
    for backend, engines, fallback in (("gptq", ("exllamav2", "gemlite", "gptqmodel-torch"), "gptq-layout"),
                                       ("awq", ("autoawq", "gemlite", "gptqmodel-awq-torch"), "awq-layout")):
        b = registry.get(backend)
        first = vllm[backend]
        assert b.kernels[:len(first) + 3] == first + engines and b.kernels[-1] == fallback
        layer = b.from_int4(w, None)  # fp32 activations: no engine takes them
        rejected = dict(layer.rejected_kernels)
        assert set(rejected) == set(first + engines), rejected
        assert layer.kernel == "reference-torch"  # the fallback says what it is
        if find_spec("gptqmodel") is not None:
            assert "fp16/bf16 activations only" in rejected[engines[2]]  # GPTQModel takes fp16/bf16 only


def test_shape_and_dtype_limits_are_reasons():
    dev = torch.device("cuda")
    w16 = _weight(64, 256, 128, torch.float16, seed=2)
    reasons = {
        "exllamav2": get_kernel("exllamav2").can_implement(w16, dev, torch.bfloat16),
        "autoawq": get_kernel("autoawq").can_implement(w16, dev, torch.bfloat16),
        "gemlite": get_kernel("gemlite").can_implement(w16, dev, torch.float32),
    }
    for name, r in reasons.items():
        assert not r.ok and ("fp16" in r.reason), (name, r)
    for name in ENGINES:
        assert get_kernel(name).can_implement(w16, dev, torch.float16).ok, name

    zero0 = Int4Weight(w16.qweight, w16.scales, torch.zeros_like(w16.zeros), 128)
    r = get_kernel("exllamav2").can_implement(zero0, dev, torch.float16)
    assert not r.ok and "zero-point of 0" in r.reason
    ao = _weight(64, 256, 128, torch.float16, act_order=True, seed=3)
    r = get_kernel("autoawq").can_implement(ao, dev, torch.float16)
    assert not r.ok and "act-order" in r.reason
    assert get_kernel("exllamav2").can_implement(ao, dev, torch.float16).ok
    odd = _weight(60, 256, 128, torch.float16, seed=4)
    assert not get_kernel("exllamav2").can_implement(odd, dev, torch.float16).ok
    narrow = _weight(64, 80, -1, torch.float16, seed=5)  # per-channel: K = 80
    assert "divisible by 32" in get_kernel("gemlite").can_implement(narrow, dev, torch.float16).reason


def test_chooser_on_a_gpu_weight_without_engines_falls_back():
    w = _weight(64, 256, 128, torch.bfloat16, seed=6)
    c = choose(("exllamav2", "gemlite", "gptq-layout"), w, CPU, torch.bfloat16)
    assert c.kernel.name == "gptq-layout"
    assert [n for n, _ in c.rejected] == ["exllamav2", "gemlite"]


@pytest.mark.skipif(find_spec("awq") is None, reason="autoawq is not installed")
@pytest.mark.parametrize("g", [32, 64, 128])
def test_autoawq_layout_dequantizes_to_the_canonical_weight(g):
    from quantbridge.adapters.autoawq import AutoAWQLinear

    w = _weight(96, 256, g, torch.float16)
    layer = AutoAWQLinear(w, None)
    got = layer.dequantize().double()
    want = w.dequantize(torch.float64)
    # fp16 scales in both: the same products, rounded once to fp16 by AutoAWQ's dequantization
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), (got - want).abs().max()
    assert layer.weight_nbytes == w.qweight.numel() + (w.zeros.numel() // 2) + w.scales.numel() * 2
    assert "autoawq" in layer.kernel and "WQLinear_GEMM" in layer.kernel


@pytest.mark.skipif(find_spec("awq") is None, reason="autoawq is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs it on the device")
@pytest.mark.parametrize("k,g,n", [(256, 128, 64), (576, 64, 192), (320, 32, 64)])
def test_autoawq_triton_gemm_through_the_interpreter(monkeypatch, k, g, n):
    """AutoAWQ's own Triton GEMM (awq_gemm_triton) on the tensors built for its layer, run by
    Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1 without a GPU). Only its
    CUDA device guard is replaced: there is no CUDA device to switch to."""
    import contextlib

    from quantbridge.adapters.autoawq import AutoAWQLinear, import_gemm

    import_gemm()
    import awq.modules.triton.gemm as triton_gemm

    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setattr(triton_gemm, "get_same_device_cm", lambda t: contextlib.nullcontext())
    w = _weight(n, k, g, torch.float16)
    bias = torch.randn(n, dtype=torch.float16) * 0.1
    layer = AutoAWQLinear(w, bias)
    for m in (1, 5):
        x = torch.randn(m, k, dtype=torch.float16)
        y = layer(x)
        want = x.double() @ w.dequantize(torch.float64).t() + bias.double()
        rel = ((y.double() - want).norm() / want.norm()).item()
        assert y.shape == (m, n) and rel < 2e-3, rel  # fp16 products, fp32 accumulation


@pytest.mark.skipif(find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
@pytest.mark.parametrize("name,act_order", [("gptqmodel-torch", False), ("gptqmodel-torch", True),
                                            ("gptqmodel-awq-torch", False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gptqmodel_torch_layers_on_cpu(name, act_order, dtype):
    """GPTQModel's own torch layers on quantbridge's GPTQ v2 / AWQ tensors: the layer's output on
    random inputs against the float64 product of the canonical weight, and its own dequantization."""
    k = get_kernel(name)
    assert k.available(CPU).ok
    w = _weight(192, 576, 64, dtype, act_order=act_order)
    assert k.can_implement(w, CPU, dtype).ok
    bias = torch.randn(192, dtype=dtype) * 0.1
    layer = k.build(w, bias)
    assert layer.kernel.startswith("gptqmodel 7.") and "skipped on CPU" in layer.kernel
    want_w = w.dequantize(torch.float64)
    # its dequantization computes in the activation dtype, possibly as q*s - z*s (two rounded
    # products): each weight within 2 unit roundoffs (fp16 2^-11, bf16 2^-8) of |w| + 16 s of its
    # group. (A fixed absolute bound failed now and then on bf16 weights near 0.3.)
    from quantbridge.plugin.packed import unpermute_columns

    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    s = unpermute_columns(w.scales.double().repeat_interleave(w.group_size, dim=1), w.perm)
    assert ((layer.dequantize().double() - want_w).abs() <= 2 * u * (want_w.abs() + 16 * s)).all()
    for m in (1, 9):
        x = torch.randn(m, 576, dtype=dtype)
        y = layer(x)
        want = x.double() @ want_w.t() + bias.double()
        rel = ((y.double() - want).norm() / want.norm()).item()
        assert y.dtype == dtype and rel < {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], rel


# -- on a GPU ----------------------------------------------------------------------------------

CASES = [  # (kernel, dtype, symmetric, act_order)
    ("exllamav2", torch.float16, True, False),
    ("exllamav2", torch.float16, False, False),
    ("exllamav2", torch.float16, True, True),
    ("gemlite", torch.float16, False, False),
    ("gemlite", torch.bfloat16, False, False),
    ("gemlite", torch.bfloat16, False, True),
    ("autoawq", torch.float16, False, False),
    ("gptqmodel-torch", torch.float16, False, True),
    ("gptqmodel-awq-torch", torch.bfloat16, False, False),
]
# Relative Frobenius error of y against the float64 product of the canonical weight: the
# engines compute in fp16/bf16 (gemlite also rounds -zero*scale to the activation dtype).
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype,symmetric,act_order", CASES)
def test_engine_output_against_float64(name, dtype, symmetric, act_order):
    pkg = {"exllamav2": "exllamav2", "gemlite": "gemlite", "autoawq": "awq"}.get(name, "gptqmodel")
    if find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed")
    dev = torch.device("cuda")
    k = get_kernel(name)
    assert k.available(dev).ok
    for n, kk in ((256, 512), (1024, 4096)):
        w = _weight(n, kk, 128, dtype, device=dev, symmetric=symmetric, act_order=act_order)
        assert k.can_implement(w, dev, dtype).ok
        bias = torch.randn(n, device=dev, dtype=dtype) * 0.1
        layer = k.build(w, bias)
        ref_w = w.dequantize(torch.float64)
        deq = layer.dequantize().double()
        assert (deq - ref_w.cpu()).norm() / ref_w.norm() < TOL[dtype], name  # the engine's own view of its layout
        for m in (1, 7, 16, 100):
            x = torch.randn(m, kk, device=dev, dtype=dtype)
            y = layer(x)
            assert y.shape == (m, n)
            want = x.double() @ ref_w.t().to(dev) + bias.double()
            rel = ((y.double() - want).norm() / want.norm()).item()
            assert rel < TOL[dtype], (name, m, rel)
        del layer
        torch.cuda.synchronize()


@pytest.mark.skipif(find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
def test_cpu_matrix_one_weights_through_every_kernel_here():
    """The quantizer x kernel matrix on the CPU: the same RTN weights through the reference, both
    GPTQModel torch layers, and the CUDA engines (unavailable rows that say why), in bf16."""
    from quantbridge.models.load import load_model
    from quantbridge.run.compare import Settings, run_comparison

    tiny16 = load_model("tiny", CPU, torch.bfloat16)
    s = Settings(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64, weights="native",
                 kernels=["reference", "gptqmodel-torch", "gptqmodel-awq-torch", "exllamav2", "autoawq"],
                 skip_unavailable=True)
    comp = run_comparison(tiny16, [], s, CPU, torch.bfloat16)
    rows = {b.name: b for b in comp.backends}
    ran = [rows[f"native+{k}"] for k in ("reference", "gptqmodel-torch", "gptqmodel-awq-torch")]
    for b in ran:
        assert b.status == "ok", (b.name, b.reason)
    assert {lay.kernel for lay in ran[1].layers if lay.quantized} == {
        "gptqmodel 7.7.0 TorchLinear, eager: its torch.compile step skipped on CPU"}
    for k in ("exllamav2", "autoawq"):
        b = rows[f"native+{k}"]
        assert b.status == "unavailable" and ("CUDA" in b.reason or "not installed" in b.reason), b.reason
    # the same weights: each layer's isolated error is the same within bf16 rounding
    for layers in zip(*(b.layers for b in ran)):
        if not layers[0].quantized:
            continue
        errs = [lay.error["rel_isolated"] for lay in layers]
        assert max(errs) - min(errs) < 0.1 * min(errs), (layers[0].name, errs)

"""Pack/unpack and quantize/dequantize round trips on many random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, pack_int4, quantize_rtn, unpack_int4
from quantbridge.plugin.spec import QuantSpec


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k2=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_pack_unpack_exact(n, k2, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, 2 * k2), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (n, k2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    # low nibble = even column
    assert torch.equal(packed & 0xF, q[:, 0::2])


def test_pack_rejects_odd_k():
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def _exact_weight(n, k, gs, sym, gen):
    """An Int4Weight whose every group uses codes 0 and 15, so RTN must recover it exactly."""
    groups = k // gs
    q = torch.randint(0, 16, (n, k), generator=gen)
    q = q.reshape(n, groups, gs)
    q[..., 0], q[..., 1] = 0, 15
    q = q.reshape(n, k)
    scales = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    zeros = torch.full((n, groups), 8) if sym else torch.randint(1, 15, (n, groups), generator=gen)
    return Int4Weight(pack_int4(q), scales, zeros.to(torch.uint8), gs)


@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_rtn_recovers_representable_weights(gs):
    gen = torch.Generator().manual_seed(gs + 100)
    for n, k in [(8, 256), (33, 128), (5, 512)]:
        g = k if gs == -1 else gs
        w = _exact_weight(n, k, g, False, gen)
        dq = w.dequantize(torch.float64).float()
        again = quantize_rtn(dq, QuantSpec(group_size=gs), scale_dtype=torch.float32)
        assert torch.equal(again.codes(), w.codes())
        assert torch.equal(again.zeros, w.zeros)
        torch.testing.assert_close(again.scales, w.scales, rtol=1e-5, atol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), groups=st.integers(1, 6), gs=st.sampled_from([32, 64, 128]),
       sym=st.booleans(), seed=st.integers(0, 2**31))
def test_rtn_error_bounded_by_step(n, groups, gs, sym, seed):
    k = groups * gs
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.1)
    qw = quantize_rtn(w, QuantSpec(group_size=gs, symmetric=sym))
    dq = qw.dequantize(torch.float64)
    step = qw.scales.double().repeat_interleave(gs, dim=1)
    err = (dq - w.double()).abs()
    # Interior values round to the nearest level (≤ step/2); only a group's clamped extremes
    # (its largest or smallest weight) can be off by more, and by at most one step.
    assert (err <= step * (1 + 1e-6)).all()
    wg = w.double().reshape(n, groups, gs)
    extreme = (wg == wg.amax(-1, keepdim=True)) | (wg == wg.amin(-1, keepdim=True))
    beyond_half = (err > step / 2 * (1 + 1e-6)).reshape(n, groups, gs)
    assert not (beyond_half & ~extreme).any()
    if sym:
        assert (qw.zeros == 8).all()


def test_rtn_relative_error_plausible():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=gen)
    for gs, lo, hi in [(32, 0.03, 0.12), (128, 0.05, 0.15), (-1, 0.08, 0.25)]:
        dq = quantize_rtn(w, QuantSpec(group_size=gs)).dequantize()
        rel = ((dq - w).norm() / w.norm()).item()
        assert lo < rel < hi, (gs, rel)


def test_act_order_perm_roundtrip():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=gen)
    perm = torch.randperm(256, generator=gen)
    qw = quantize_rtn(w, QuantSpec(group_size=64), perm=perm)
    plain = quantize_rtn(w[:, perm], QuantSpec(group_size=64))
    # storage order is permuted; dequantize() returns the original column order
    assert torch.equal(qw.codes(), plain.codes())
    torch.testing.assert_close(qw.dequantize()[:, perm], plain.dequantize())


def test_nbytes_counts_every_tensor():
    w = quantize_rtn(torch.randn(64, 256), QuantSpec(group_size=128), scale_dtype=torch.float16)
    assert w.nbytes == 64 * 128 + 64 * 2 * 2 + 64 * 2


def test_spec_validation():
    with pytest.raises(UserError, match="group size 48"):
        QuantSpec(group_size=48)
    with pytest.raises(UserError, match="does not divide in_features=96"):
        QuantSpec(group_size=64).check_layer("x.proj", 96)
    QuantSpec(group_size=-1).check_layer("x.proj", 96)


def test_group_size_auto_fits_the_layers():
    from quantbridge.plugin.errors import UserError
    from quantbridge.plugin.spec import AUTO_GROUP, QuantSpec

    auto = QuantSpec(group_size=AUTO_GROUP)
    assert auto.fitted({"a": 4096, "b": 14336}).group_size == 128
    assert auto.fitted({"q": 576, "down": 1536}).group_size == 64  # SmolLM2-135M: 576 = 9 x 64
    assert auto.fitted({"x": 96}).group_size == 32
    with pytest.raises(UserError, match="no group size of 128, 64 or 32 divides every quantized layer"):
        auto.fitted({"odd": 100})
    with pytest.raises(UserError, match=r"use --group-size 64 or 32 \(dividing every quantized layer\), auto"):
        QuantSpec(group_size=128).fitted({"q": 576, "down": 1536})
    assert QuantSpec(group_size=-1).fitted({"odd": 100}).group_size == -1

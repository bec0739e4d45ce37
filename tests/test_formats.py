"""Codec round trips: canonical <-> GPTQ / AWQ / compressed-tensors / native, bit-exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantbridge import formats
from quantbridge.formats.int32pack import pack_nibbles, unpack_nibbles
from quantbridge.plugin.packed import Int4Weight, canonical_perm, pack_int4


def random_weight(n, k, g, *, sym=False, act_order=False, seed=0, scale_dtype=torch.float16) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3).to(scale_dtype)
    zeros = torch.full((n, k // g), 8, dtype=torch.uint8) if sym else \
        torch.randint(1, 16, (n, k // g), generator=gen, dtype=torch.uint8)  # GPTQ v1 cannot hold z = 0
    perm = torch.randperm(k, generator=gen) if act_order else None
    return canonical_perm(Int4Weight(pack_int4(codes), scales, zeros, g, perm))


def assert_same(a: Int4Weight, b: Int4Weight) -> None:
    assert a.group_size == b.group_size
    for x, y in ((a.qweight, b.qweight), (a.scales, b.scales), (a.zeros, b.zeros)):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (a.perm is None) == (b.perm is None)
    if a.perm is not None:
        assert torch.equal(a.perm, b.perm)


@settings(max_examples=40, deadline=None)
@given(words=st.integers(1, 12), rows=st.integers(1, 9), seed=st.integers(0, 2**31),
       order=st.permutations(range(8)))
def test_nibble_pack_round_trip(words, rows, seed, order):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, 8 * words), generator=gen, dtype=torch.uint8)
    packed = pack_nibbles(codes, tuple(order))
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_nibbles(packed, tuple(order)), codes)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors", "native"])
@pytest.mark.parametrize("n,k,g", [(64, 256, 128), (24, 128, 32), (8, 192, 64), (16, 96, 96)])
@pytest.mark.parametrize("sym", [False, True])
def test_codec_round_trip(fmt, n, k, g, sym):
    codec = formats.get(fmt)
    w = random_weight(n, k, g, sym=sym, seed=n * k + g)
    back = codec.decode(codec.encode(w), {})
    assert_same(w, back)
    torch.testing.assert_close(back.dequantize(torch.float64), w.dequantize(torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "native"])
def test_act_order_round_trip(fmt):
    codec = formats.get(fmt)
    w = random_weight(32, 256, 64, act_order=True, seed=3)
    back = codec.decode(codec.encode(w), {})
    assert_same(w, back)


def test_awq_rejects_act_order():
    with pytest.raises(ValueError, match="act-order"):
        formats.get("awq").encode(random_weight(8, 128, 32, act_order=True))


def test_gptq_v1_zero_offset_and_zero_point_zero():
    w = random_weight(16, 128, 32, seed=5)
    t = formats.get("gptq").encode(w)
    # v1 stores zero-point - 1: the first stored nibble is z[0, 0] - 1
    assert int(t["qzeros"][0, 0]) & 0xF == int(w.zeros[0, 0]) - 1
    assert_same(formats.get("gptq").decode(t, {"checkpoint_format": "gptq"}), w)
    v2 = formats.gptq.GPTQCodec("gptq_v2")
    assert_same(v2.decode(v2.encode(w), {"checkpoint_format": "gptq_v2"}), w)
    w.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        formats.get("gptq").encode(w)
    assert_same(v2.decode(v2.encode(w), {"checkpoint_format": "gptq_v2"}), w)


def test_gptq_checkpoint_format_is_read_from_either_field():
    """vLLM reads `checkpoint_format`, GPTQModel and transformers `format`: either decides v1/v2;
    a disagreement or another layout under quant_method gptq (marlin, gptq_p) is refused, never read as v1."""
    w = random_weight(16, 128, 32, seed=6)
    v2 = formats.gptq.GPTQCodec("gptq_v2").encode(w)
    codec = formats.get("gptq")
    for qcfg in ({"format": "gptq_v2"}, {"checkpoint_format": "gptq_v2"},
                 {"format": "GPTQ_V2", "checkpoint_format": "gptq_v2"}):
        assert_same(codec.decode(v2, qcfg), w)
    for qcfg, msg in (({"checkpoint_format": "gptq", "format": "gptq_v2"}, "disagree"),
                      ({"checkpoint_format": "marlin"}, "'marlin' is not supported"),
                      ({"format": "gptq_p"}, "'gptq_p' is not supported")):
        with pytest.raises(ValueError, match=msg):
            codec.decode(v2, qcfg)


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_variant_written_for_a_checkpoint(sym):
    """Symmetric: v1 (every GPTQ reader); asymmetric: gptq_v2 (what GPTQModel loads without a
    meta.quantizer naming itself). Both metadata fields name it; the tensors decode back."""
    from quantbridge.plugin.spec import QuantSpec

    spec = QuantSpec(symmetric=sym)
    codec = formats.get("gptq").for_checkpoint(spec)
    fmt = "gptq" if sym else "gptq_v2"
    qcfg = codec.quantization_config(spec, [])
    assert qcfg["checkpoint_format"] == qcfg["format"] == fmt and qcfg["sym"] is sym
    assert codec.label == ("gptq (v1)" if sym else "gptq (v2)")
    w = random_weight(24, 256, 64, sym=sym, seed=8)
    if not sym:
        w.zeros[0, 0] = 0  # v2 holds the zero-point 0 that v1 cannot
    assert_same(formats.get("gptq").decode(codec.encode(w), qcfg), w)


def test_compressed_tensors_refuses_writing_act_order():
    from quantbridge.plugin.errors import UserError
    from quantbridge.plugin.spec import QuantSpec

    ct = formats.get("compressed-tensors")
    assert ct.for_checkpoint(QuantSpec()) is ct
    with pytest.raises(UserError, match="actorder 'group'"):
        ct.for_checkpoint(QuantSpec(act_order=True))


def test_gptq_awq_native_gptq_chain_is_bit_identical():
    """GPTQ tensors -> canonical -> AWQ -> canonical -> native -> canonical -> GPTQ tensors."""
    gptq, awq, native = (formats.get(f) for f in ("gptq", "awq", "native"))
    src = gptq.encode(random_weight(48, 384, 128, seed=11))
    w = gptq.decode(src, {})
    w = awq.decode(awq.encode(w), {})
    w = native.decode(native.encode(w), {})
    out = gptq.encode(w)
    assert src.keys() == out.keys()
    for key in src:
        assert src[key].dtype == out[key].dtype and torch.equal(src[key], out[key]), key


def test_layouts_match_their_definitions():
    """Spot-check each layout against its written definition, element by element."""
    w = random_weight(16, 64, 32, seed=7)
    codes = w.codes()
    g = formats.get("gptq").encode(w)["qweight"]
    a = formats.get("awq").encode(w)["qweight"]
    c = formats.get("compressed-tensors").encode(w)["weight_packed"]
    nib = lambda word, i: (int(word) & 0xFFFFFFFF) >> (4 * i) & 0xF  # noqa: E731
    for n, k in [(0, 0), (3, 9), (15, 63), (7, 33)]:
        assert nib(g[k // 8, n], k % 8) == codes[n, k]
        assert nib(c[n, k // 8], k % 8) == codes[n, k]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for k, n in [(0, 0), (5, 3), (63, 15), (31, 9)]:
        assert nib(a[k, n // 8], order.index(n % 8)) == codes[n, k]


def test_compressed_tensors_matches_library_packing():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    w = random_weight(24, 256, 128, seed=9)
    ours = formats.get("compressed-tensors").encode(w)
    signed = (w.codes().to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(ours["weight_packed"], ct.pack_to_int32(signed, 4))
    zp_signed = (w.zeros.to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(ours["weight_zero_point"], ct.pack_to_int32(zp_signed, 4, packed_dim=0))


def test_detect():
    assert formats.detect({"quant_method": "gptq"}).name == "gptq"
    assert formats.detect({"quant_method": "awq", "version": "gemm"}).name == "awq"
    assert formats.detect({"quant_method": "compressed-tensors", "format": "pack-quantized"}).name == "compressed-tensors"
    from quantbridge.plugin.errors import UserError
    with pytest.raises(UserError, match="unsupported"):
        formats.detect({"quant_method": "fp8"})

"""vLLM's own INT4 kernels (machete, marlin, vllm-exllama): the loader, the weight transforms, the
rules, and on a GPU the kernels' outputs.

On the CPU: every transform vLLM applies before its kernels run (written in torch in
adapters/_vllm_pack.py) against an independent reference on fresh random inputs; the loader on a
fake vllm package laid out in tmp_path (whose __init__ raises if anything imports it): not
installed, an unchecked version refused in one line, no kernel library, a library that fails to
load, an op whose schema differs (that kernel refused, the others not), no CUDA; `env` naming the
version and the library; the chooser passing over the three with their reasons. On a GPU
(marked gpu; QB_REQUIRE_VLLM=1 turns "vLLM not found" from a skip into a failure): each kernel's
output against the float64 product of its own dequantized weight at M = 1, 16, 128, 512, fp16
and bf16, symmetric and with zero-points, act-order for Marlin (and the others that take it).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from importlib.machinery import PathFinder

import pytest
import torch

from quantbridge.adapters import _vllm_ops as vo
from quantbridge.adapters import _vllm_pack as vp
from quantbridge.formats.awq import AWQCodec
from quantbridge.formats.gptq import GPTQCodec
from quantbridge.formats.int32pack import g_idx_from_perm
from quantbridge.plugin import backend as registry
from quantbridge.plugin.kernel import PRIORITY, get_kernel, kernels_for
from quantbridge.plugin.packed import Int4Weight, pack_int4, quantize_rtn
from quantbridge.plugin.spec import QuantSpec

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
NAMES = ("machete", "marlin", "vllm-exllama")
LIB = "_C_stable_libtorch.abi3.so"


def _weight(n: int, k: int, g: int, dtype=torch.float32, symmetric=False, act_order=False, device="cpu",
            seed: int | None = None) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    w = torch.randn(n, k, generator=gen) * 0.05
    perm = None
    if act_order:  # a real act-order weight: columns stored in a permuted order (each group's ascending)
        perm = torch.randperm(k, generator=gen).view(-1, g if g > 0 else k).sort(dim=1).values.flatten()
    if g in (32, 64, 128, -1):
        q = quantize_rtn(w.to(dtype), QuantSpec(group_size=g, symmetric=symmetric), scale_dtype=dtype, perm=perm)
    else:  # a group size quantbridge's RTN does not make (a checkpoint's): per-channel codes of each g columns
        parts = [quantize_rtn(w[:, i:i + g].to(dtype), QuantSpec(group_size=-1, symmetric=symmetric), scale_dtype=dtype)
                 for i in range(0, k, g)]
        q = Int4Weight(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                       torch.cat([p.zeros for p in parts], 1), g)
    return q.to(device) if device != "cpu" else q


def _random_codes(n, k, gen):
    return torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)


# -- the transforms, against independent references --------------------------------------------

def test_weight_type_and_the_uint4b8_reading():
    gen = torch.Generator().manual_seed(11)
    for g in (32, 128, 256):
        sym = _weight(64, 512, g, symmetric=True, seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
        assert vp.weight_type(sym) == "uint4b8"
        # uint4b8 reads the raw codes with a bias of 8: (q - z) * s with the canonical zero-points,
        # exactly (float64 throughout)
        got = vp.dequantize_uint4b8(sym.codes(), sym.scales, sym.group_size)
        z = sym.zeros.double().repeat_interleave(g, dim=1)
        assert torch.equal(got, (sym.codes().double() - z) * sym.scales.double().repeat_interleave(g, dim=1))
        assert torch.allclose(got, sym.dequantize(torch.float64), rtol=1e-6, atol=0)  # fp32 canonical arithmetic
        asym = _weight(64, 512, g, symmetric=False, seed=int(torch.randint(0, 2**30, (1,), generator=gen)))
        assert bool((asym.zeros != 8).any()) and vp.weight_type(asym) == "uint4"
    one = Int4Weight(sym.qweight, sym.scales, sym.zeros.clone(), sym.group_size)
    one.zeros[3, 0] = 7  # a single zero-point other than 8 makes it uint4 with zero-points
    assert vp.weight_type(one) == "uint4"
    w = _weight(64, 256, 256, seed=3)
    assert vp.vllm_group_size(w) == -1 and vp.vllm_group_size(_weight(64, 256, 64, seed=4)) == 64


def test_pack_rows_is_gptq_packing_along_k():
    gen = torch.Generator().manual_seed(5)
    codes = _random_codes(48, 128, gen)
    words = vp.pack_rows(codes)
    assert words.shape == (16, 48) and words.dtype == torch.int32
    # reference: each nibble read back with plain shifts on the unsigned word
    u = words.to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        assert torch.equal(((u >> (4 * i)) & 0xF).to(torch.uint8), codes[:, i::8].t())
    # and the GPTQ codec's qweight for the same codes (another implementation in this repo)
    w = Int4Weight(pack_int4(codes), torch.rand(48, 1) + 0.1, torch.full((48, 1), 8, dtype=torch.uint8), 128)
    assert torch.equal(words, GPTQCodec("gptq").encode(w)["qweight"])


def test_scale_permutations_against_their_closed_forms():
    perm, single = vp.scale_perms()
    # Marlin's 64-column permutation is the transpose of 8x8 blocks; the single one swaps 2-column
    # pairs across a 4x4 grid of them
    assert perm == torch.arange(64).reshape(8, 8).t().flatten().tolist()
    assert single == torch.arange(32).reshape(4, 4, 2).transpose(0, 1).flatten().tolist()
    assert sorted(perm) == list(range(64)) and sorted(single) == list(range(32))


@pytest.mark.parametrize("groups,n,group_size,k", [(8, 256, 128, 1024), (4, 192, 32, 128), (1, 128, -1, 512)])
def test_marlin_permute_scales(groups, n, group_size, k):
    gen = torch.Generator().manual_seed(groups * n)
    s = torch.rand(groups, n, generator=gen, dtype=torch.float64) + 0.5
    got = vp.marlin_permute_scales(s, k, n, group_size)
    if group_size == -1:  # one group per row: the 32-column permutation
        want = s.reshape(-1, 4, 4, 2).transpose(1, 2).reshape(groups, n)
    else:
        want = s.reshape(-1, 8, 8).transpose(1, 2).reshape(groups, n)
    assert torch.equal(got, want)
    b = torch.rand(n, generator=gen, dtype=torch.float64)
    assert torch.equal(vp.marlin_permute_bias(b), b.reshape(-1, 4, 4, 2).transpose(1, 2).reshape(n))


@pytest.mark.parametrize("groups,n", [(8, 128), (1, 64), (32, 256)])
def test_marlin_zero_points(groups, n):
    gen = torch.Generator().manual_seed(groups + n)
    zp = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.int32)
    words = vp.marlin_zero_points(zp, n)
    assert words.shape == (groups, n // 8) and words.dtype == torch.int32
    # reference: the 8x8 transpose within each 64 columns, then 0,2,4,6,1,3,5,7 within each 8, then
    # nibble i of word j = element 8j + i, packed with python integers
    inter = zp.reshape(-1, 8, 8).transpose(1, 2).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(groups, n)
    for r in range(groups):
        for j in range(n // 8):
            word = sum(int(inter[r, 8 * j + i]) << (4 * i) for i in range(8))
            assert int(words[r, j]) & 0xFFFFFFFF == word


def test_act_order_sort_indices_are_the_canonical_permutation():
    for g in (32, 128):
        w = _weight(64, 1024, g, symmetric=True, act_order=True)
        g_idx = g_idx_from_perm(w.perm, w.in_features, g, w.perm.device)
        sorted_idx, order = vp.marlin_sort_g_idx(g_idx)
        assert order.dtype == torch.int32
        assert torch.equal(sorted_idx.long(), torch.arange(1024) // g)  # every group's columns together
        assert torch.equal(order.long(), w.perm)  # a stable sort gives back the stored order
        # gathered by the indices, input-order codes are the stored ones (what the repack applies)
        from quantbridge.formats.int32pack import to_input_order
        assert torch.equal(to_input_order(w.codes(), w.perm)[:, order.long()], w.codes())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_machete_zero_term(dtype):
    w = _weight(128, 512, 64, dtype=dtype, symmetric=False)
    scales, zeros = w.scales.t().contiguous(), w.zeros.t().contiguous()
    term = vp.machete_zero_term(zeros, scales)
    assert term.dtype == dtype and term.shape == scales.shape
    # one rounding of the exact product -z*s (z is exact in either dtype)
    assert torch.equal(term, (-(scales.double() * zeros.double())).to(dtype))
    # q*s + term is the canonical weight within the two roundings of the activation dtype
    q = w.codes().double()
    rebuilt = q * w.scales.double().repeat_interleave(64, 1) + term.t().double().repeat_interleave(64, 1)
    u = torch.finfo(dtype).eps
    s = w.scales.double().repeat_interleave(64, 1)
    assert ((rebuilt - w.dequantize(torch.float64)).abs() <= u * 16 * s).all()


def test_exllama_zero_points_v1_and_v2():
    w = _weight(64, 256, 32, symmetric=False, seed=7)
    w.zeros[0, 0] = 0  # v2 holds a zero-point of 0, v1 cannot
    v2 = vp.exllama_zeros(w, v2=True)
    assert torch.equal(v2, GPTQCodec("gptq_v2").encode(w)["qzeros"])
    assert torch.equal(vp.unpack_cols(v2), w.zeros.t().to(torch.int32))
    with pytest.raises(ValueError, match="zero-point of 0"):
        vp.exllama_zeros(w, v2=False)
    s = _weight(64, 256, 32, symmetric=True, seed=8)
    v1 = vp.exllama_zeros(s, v2=False)
    assert bool((vp.unpack_cols(v1) == 7).all())  # uint4b8's bias - 1, as vLLM fills it
    assert torch.equal(v1, GPTQCodec("gptq").encode(s)["qzeros"])


def test_awq_weights_packed_as_gptq_are_the_same_codes():
    """vLLM 0.26 converts an AWQ checkpoint to GPTQ packing before Marlin/Machete; the codes and
    zero-points the adapters hand over are the AWQ tensors' own, reordered."""
    w = _weight(128, 256, 64, symmetric=False, seed=9)
    t = AWQCodec().encode(w)
    back = AWQCodec().decode(t, {"version": "gemm"})
    assert torch.equal(vp.pack_rows(back.codes()), vp.pack_rows(w.codes()))
    assert torch.equal(vp.marlin_zero_points(back.zeros.t(), 128), vp.marlin_zero_points(w.zeros.t(), 128))


# -- the rules (vLLM's can_implement), with a given compute capability ---------------------------

def _rules(name, w, dtype, cap=(9, 0)):
    return get_kernel(name).rules(w, dtype, cap)


def test_rules_say_why_not():
    h16 = torch.float16
    sym = _weight(256, 512, 128, h16, symmetric=True, seed=20)
    asym = _weight(256, 512, 128, h16, seed=21)
    ao = _weight(256, 512, 128, h16, symmetric=True, act_order=True, seed=22)
    ao_zp = _weight(256, 512, 128, h16, act_order=True, seed=23)
    for name in NAMES:
        assert _rules(name, sym, h16) == [], name
        assert _rules(name, asym, h16) == [], name
        assert _rules(name, ao, h16) == [], name
    assert _rules("machete", sym, h16, (8, 0))[0].startswith("Machete needs compute capability 9.0")
    assert _rules("machete", sym, torch.bfloat16) == [] and _rules("marlin", sym, torch.bfloat16) == []
    assert "fp16 activations only" in _rules("vllm-exllama", sym, torch.bfloat16)[0]
    assert "fp16/bf16" in _rules("marlin", sym, torch.float32)[0]
    assert "act-order with zero-points" in _rules("marlin", ao_zp, h16)[0]
    assert _rules("machete", ao_zp, h16) == []
    g32 = _weight(256, 512, 32, h16, symmetric=True, seed=24)
    assert "group size 32" in _rules("machete", g32, h16)[0] and _rules("marlin", g32, h16) == []
    g256 = _weight(256, 512, 256, h16, symmetric=True, seed=25)
    assert "group size 256" in _rules("marlin", g256, h16)[0]
    chan = _weight(256, 512, -1, h16, symmetric=True, seed=26)
    assert _rules("marlin", chan, h16) == [] and _rules("machete", chan, h16) == []
    assert "channelwise" in _rules("vllm-exllama", chan, h16)[0]
    narrow = _weight(192, 576, 64, h16, symmetric=True, seed=27)  # SmolLM2's shapes: K % 128 and N % 128 fail
    assert "out_features 192 not divisible by 128" in _rules("machete", narrow, h16)[0]
    assert "fits neither Marlin tile" in _rules("marlin", narrow, h16)[0]
    other_tile = _weight(256, 576, 64, h16, symmetric=True, seed=28)  # N % 128 with K % 64: no padding needed
    assert _rules("marlin", other_tile, h16) == []
    ao_other = _weight(256, 576, 64, h16, symmetric=True, act_order=True, seed=29)
    assert "act-order needs out_features % 64 and in_features % 128" in _rules("marlin", ao_other, h16)[0]
    assert "Marlin needs compute capability 7.5" in _rules("marlin", sym, h16, (7, 0))[0]
    assert "on compute capability 7.5 Marlin takes fp16" in _rules("marlin", sym, torch.bfloat16, (7, 5))[0]


# -- the loader, on a fake vllm package ----------------------------------------------------------

STUB_SCALAR_TYPE = '''
import functools

class _T:
    def __init__(self, i):
        self._i = i

    @functools.cached_property
    def id(self):
        return self._i

class scalar_types:
    uint4b8 = _T(4321)
    uint4 = _T(8765)
'''
_ns_count = itertools.count()


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """make(version=..., library=True, scalar=True, dist=True, schemas=None): a vllm package in
    tmp_path whose import raises; its "library" registers `schemas` (default: vLLM 0.26's) in a
    fresh op namespace when loaded."""
    libs = []
    ns = f"_qbtest_vllm{next(_ns_count)}_{os.getpid()}"
    monkeypatch.setattr(vo, "NAMESPACE", ns)
    monkeypatch.delenv(vo.UNCHECKED_ENV, raising=False)

    def make(version="0.26.0", library=True, scalar=True, dist=True, version_file=False, schemas=None, load_error=None):
        site = tmp_path / "site"
        pkg = site / "vllm"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('vllm must not be imported by quantbridge')\n")
        if library:
            (pkg / LIB).write_bytes(b"not a real library")
        if scalar:
            (pkg / "scalar_type.py").write_text(STUB_SCALAR_TYPE)
        if dist:
            d = site / f"vllm-{version}.dist-info"
            d.mkdir()
            (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
        if version_file:
            (pkg / "_version.py").write_text(f"__version__ = version = '{version}'\n")

        def load(path):
            assert path == pkg / LIB
            if load_error:
                raise OSError(load_error)
            lib = torch.library.Library(ns, "DEF")
            for s in (schemas if schemas is not None else vo.SCHEMAS_0_26).values():
                lib.define(s)
            libs.append(lib)

        monkeypatch.setattr(vo, "load_library", load)
        monkeypatch.setattr(vo, "find_vllm_spec", lambda: PathFinder.find_spec("vllm", [str(site)]))
        vo.reset()
        return pkg

    yield make
    vo.reset()
    for lib in libs:
        lib._destroy()
    assert "vllm" not in sys.modules


def _on_cuda(monkeypatch):
    """The loader's CUDA question answered yes (the op checks need no device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_not_installed(monkeypatch):
    monkeypatch.setattr(vo, "find_vllm_spec", lambda: None)
    vo.reset()
    try:
        for name in NAMES:
            a = get_kernel(name).available(CUDA)
            assert not a.ok and a.reason.startswith("vLLM 0.26.0 is not installed") and "\n" not in a.reason
        assert get_kernel("marlin").install_hint == "pip install 'quantbridge[vllm-kernels]' " \
                                                   f"'torch=={torch.__version__.split('+')[0]}'"
    finally:
        vo.reset()


def test_an_unchecked_version_is_refused_in_one_line(fake_vllm, monkeypatch):
    fake_vllm(version="0.27.0")
    a = get_kernel("marlin").available(CUDA)
    assert not a.ok and "\n" not in a.reason
    assert "vLLM 0.27.0 is installed" in a.reason and "0.26.0" in a.reason and vo.UNCHECKED_ENV in a.reason
    # the switch tries it with 0.26's expectations, and says so
    monkeypatch.setenv(vo.UNCHECKED_ENV, "1")
    _on_cuda(monkeypatch)
    vo.reset()
    a = get_kernel("marlin").available(CUDA)
    assert a.ok and "vLLM 0.27.0" in a.reason and "unchecked" in a.reason


def test_version_from_version_file(fake_vllm, monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(vo, "version", missing)  # no installed distribution's metadata either
    pkg = fake_vllm(dist=False, version_file=True)
    assert vo.locate().version == "0.26.0" and vo.locate().library == pkg / LIB
    vo.reset()
    (pkg / "_version.py").unlink()
    assert "version cannot be read" in vo.locate().problem


def test_local_version_tag_is_the_release(fake_vllm):
    fake_vllm(version="0.26.0+cu130")
    f = vo.locate()
    assert f.problem is None and f.release is vo.RELEASES["0.26.0"] and f.label.startswith("vLLM 0.26.0+cu130")


def test_missing_library(fake_vllm, monkeypatch):
    fake_vllm(library=False)
    _on_cuda(monkeypatch)
    a = get_kernel("machete").available(CUDA)
    assert not a.ok and LIB in a.reason and "0.26.0" in a.reason and "\n" not in a.reason


def test_a_library_that_fails_to_load(fake_vllm, monkeypatch):
    fake_vllm(load_error="libcudart.so.13: cannot open shared object file: No such file or directory\nmore")
    _on_cuda(monkeypatch)
    a = get_kernel("vllm-exllama").available(CUDA)
    assert not a.ok and "failed to load" in a.reason and "libcudart.so.13" in a.reason and "\n" not in a.reason


def test_the_real_loader_on_a_file_that_is_no_library(fake_vllm, monkeypatch):
    fake_vllm()
    monkeypatch.setattr(vo, "load_library", lambda p: torch.ops.load_library(str(p)))
    _on_cuda(monkeypatch)
    a = get_kernel("marlin").available(CUDA)
    assert not a.ok and "failed to load" in a.reason and "\n" not in a.reason
    assert "(OSError: " in a.reason  # dlopen's own words beside torch's


def test_all_found(fake_vllm, monkeypatch):
    fake_vllm()
    _on_cuda(monkeypatch)
    for name in NAMES:
        k = get_kernel(name)
        a = k.available(CUDA)
        assert a.ok, (name, a.reason)
        assert a.reason.startswith(f"vLLM 0.26.0 ({LIB}): ") and all(op in a.reason for op in k.ops)
    assert vo.load().type_ids == {"uint4b8": 4321, "uint4": 8765}  # read from scalar_type.py as one file
    assert vo.type_id("uint4") == 8765 and vo.label() == "vLLM 0.26.0"


def test_a_changed_schema_refuses_that_kernel_only(fake_vllm, monkeypatch):
    # the current vLLM sources' marlin_gemm: no act-order arguments (g_idx, perm, is_k_full)
    later = dict(vo.SCHEMAS_0_26)
    later["marlin_gemm"] = ("marlin_gemm(Tensor a, Tensor? c_or_none, Tensor b_q_weight, Tensor? b_bias_or_none, "
                            "Tensor b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none, "
                            "Tensor workspace, int b_type_id, SymInt size_m, SymInt size_n, SymInt size_k, "
                            "bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float) -> Tensor")
    del later["permute_cols"]
    fake_vllm(schemas=later)
    _on_cuda(monkeypatch)
    m = get_kernel("marlin").available(CUDA)
    assert not m.ok and "\n" not in m.reason
    assert "marlin_gemm's argument 8 is 'Tensor workspace' where the adapter passes 'Optional[Tensor] g_idx_or_none'" \
        in m.reason
    mc = get_kernel("machete").available(CUDA)
    assert not mc.ok and "permute_cols is not in the library" in mc.reason
    assert get_kernel("vllm-exllama").available(CUDA).ok


def test_a_changed_scalar_type_file_is_a_reason(fake_vllm, monkeypatch):
    pkg = fake_vllm()
    (pkg / "scalar_type.py").write_text("class scalar_types:\n    pass\n")
    _on_cuda(monkeypatch)
    a = get_kernel("marlin").available(CUDA)
    assert not a.ok and "scalar_type.py could not be read" in a.reason


def test_no_cuda(fake_vllm, monkeypatch):
    fake_vllm()
    for name in NAMES:
        a = get_kernel(name).available(CPU)
        assert not a.ok and a.reason == f"vLLM 0.26.0 ({LIB}) found; its kernels run on CUDA only"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = get_kernel("marlin").available(CUDA)
    assert not a.ok and "sees no CUDA device" in a.reason


def test_env_names_the_version_and_the_library(fake_vllm):
    from click.testing import CliRunner

    from quantbridge.cli import cli

    fake_vllm()
    r = CliRunner().invoke(cli, ["env", "--json"])
    assert r.exit_code == 0, r.output
    kernels = {k["kernel"]: k for k in json.loads(r.output)["kernels"]}
    if not torch.cuda.is_available():
        for name in NAMES:
            assert kernels[name]["reason"] == f"vLLM 0.26.0 ({LIB}) found; its kernels run on CUDA only"
            assert "vllm-kernels" in kernels[name]["install"]
    names = list(kernels)
    assert names.index("machete") < names.index("marlin") < names.index("vllm-exllama") < names.index("exllamav2")


def test_priority_follows_vllms_order():
    assert PRIORITY[:4] == ("machete", "marlin", "vllm-exllama", "exllamav2")
    assert kernels_for("gptq")[:4] == ("machete", "marlin", "vllm-exllama", "exllamav2")
    assert kernels_for("awq")[:3] == ("machete", "marlin", "autoawq")
    # the existing kernels keep their relative order
    rest = [n for n in PRIORITY if n not in NAMES]
    assert rest == ["exllamav2", "autoawq", "gemlite", "gptqmodel-torch", "gptqmodel-awq-torch", "triton",
                    "tinygemm", "gptq-layout", "awq-layout", "reference"]


def test_the_chooser_passes_over_them_on_the_cpu(fake_vllm):
    fake_vllm()
    w = _weight(128, 256, 128, torch.bfloat16, symmetric=True, seed=30)
    for backend in ("gptq", "awq"):
        layer = registry.get(backend).from_int4(w, None)
        rejected = dict(layer.rejected_kernels)
        for name in ("machete", "marlin") + (("vllm-exllama",) if backend == "gptq" else ()):
            assert rejected[name] == f"vLLM 0.26.0 ({LIB}) found; its kernels run on CUDA only"
        assert not any(layer.kernel.startswith(p) for p in ("vLLM", "machete", "marlin"))


def test_build_exactly_says_why_on_the_cpu(fake_vllm):
    from quantbridge.plugin.errors import NotRunnable
    from quantbridge.plugin.kernel import build_exactly

    fake_vllm()
    with pytest.raises(NotRunnable, match="CUDA only"):
        build_exactly("machete", _weight(128, 256, 128, torch.float16, seed=31), None)


# -- the layers' plumbing, over CPU stand-ins for the ops ----------------------------------------
# Each stand-in computes what vLLM documents its op to compute, from the tensors the adapter hands
# it: the repack ops keep GPTQ's packing (the real layouts are opaque), the GEMMs undo the
# permutations the adapters applied and multiply in float64. An argument in the wrong place, a
# permutation not undone, a zero-point off by one fails here, before any GPU time.

UINT4B8, UINT4 = 4321, 8765  # the stub scalar_type.py's ids


def _rows(words):  # int32 [K/8, N] -> int64 codes [K, N]
    u = words.to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(u >> (4 * i)) & 0xF for i in range(8)], 1).reshape(-1, words.shape[1])


def _zeros_and_scales(b_type, zeros, scales, n):
    z = torch.full_like(scales, 8, dtype=torch.float64) if b_type == UINT4B8 else zeros
    return z, scales.double()


def _sc_marlin_gemm(a, c, b_q, bias, scales, a_scales, g_scale, zeros, g_idx, perm, ws, b_type, m, n, k, full, atomic,
                    fp32, zp_float):
    assert c is None and a_scales is None and g_scale is None and full and not atomic and fp32 and not zp_float
    assert b_type in (UINT4B8, UINT4) and ws.dtype == torch.int32 and (m, k) == tuple(a.shape) and a.is_contiguous()
    sp, single = vp.scale_perms()
    groups = scales.shape[0]
    p = sp if groups > 1 else single
    s = scales.reshape(-1, len(p))[:, torch.argsort(torch.tensor(p))].reshape(groups, n).double()
    if b_type == UINT4:
        zi = vp.unpack_cols(zeros).reshape(-1, 8)[:, torch.argsort(torch.tensor(vp.MARLIN_ZP_INTERLEAVE))]
        z = zi.reshape(-1, len(sp))[:, torch.argsort(torch.tensor(sp))].reshape(groups, n).double()
    else:
        assert zeros.numel() == 0
        z = torch.full_like(s, 8)
    codes = _rows(b_q).double()
    if perm.numel():
        a = a[:, perm.long()]
        grp = g_idx.long()
    else:
        grp = torch.arange(k) // (k // groups)
    w = (codes - z[grp]) * s[grp]
    y = a.double() @ w
    if bias is not None:
        y = y + bias.reshape(-1, len(single))[:, torch.argsort(torch.tensor(single))].reshape(n).double()
    return y.to(a.dtype)


def _sc_gptq_marlin_repack(b_q, perm, k, n, bits, a8):
    assert bits == 4 and not a8 and b_q.shape == (k // 8, n)
    return vp.pack_rows(_rows(b_q)[perm.long()].t().to(torch.uint8)) if perm.numel() else b_q.clone()


def _sc_machete_mm(a, b, b_type, out_type, scales, zeros, group_size, ch, tok, schedule):
    assert out_type is None and ch is None and tok is None and schedule is None and a.dtype == scales.dtype
    k = a.shape[1]
    g = k if group_size == -1 else group_size
    s = scales.double().repeat_interleave(g, 0)
    codes = _rows(b).double()
    if b_type == UINT4B8:
        assert zeros is None
        w = (codes - 8) * s
    else:
        assert b_type == UINT4 and zeros.dtype == a.dtype
        w = codes * s + zeros.double().repeat_interleave(g, 0)
    return (a.double() @ w).to(a.dtype)


def _sc_gptq_shuffle(q, perm, bits):
    assert bits == 4
    if perm.numel():
        q.copy_(vp.pack_rows(_rows(q)[perm.long()].t().to(torch.uint8)))


def _sc_gptq_gemm(a, b_q, qzeros, scales, q_perm, exllama, v2, bits):
    assert exllama and bits == 4 and scales.dtype == torch.float16 == a.dtype
    k = a.shape[1]
    groups = qzeros.shape[0]
    z = vp.unpack_cols(qzeros).double() + (0 if v2 else 1)
    if q_perm.numel():
        a = a[:, q_perm.long()]
    g = k // groups
    w = (_rows(b_q).double() - z.repeat_interleave(g, 0)) * scales.double().repeat_interleave(g, 0)
    return (a.double() @ w).to(a.dtype)


STAND_INS = {
    "marlin_gemm": _sc_marlin_gemm, "gptq_marlin_repack": _sc_gptq_marlin_repack,
    "machete_mm": _sc_machete_mm, "machete_prepack_B": lambda b, a_type, b_type, st: b.contiguous(),
    "permute_cols": lambda a, perm: a[:, perm.long()].contiguous(),
    "gptq_gemm": _sc_gptq_gemm, "gptq_shuffle": _sc_gptq_shuffle,
}


@pytest.fixture
def stand_ins(fake_vllm, monkeypatch):
    fake_vllm()
    _on_cuda(monkeypatch)
    assert all(get_kernel(n).available(CUDA).ok for n in NAMES)
    ns = getattr(torch.ops, vo.NAMESPACE)
    lib = torch.library.Library(vo.NAMESPACE, "IMPL")
    for op, fn in STAND_INS.items():
        lib.impl(op, fn, "CPU")
    monkeypatch.setattr(vo, "sm_count", lambda device: 132)
    monkeypatch.setattr(vo.VllmLinear, "_cuda_only", False)
    yield ns
    lib._destroy()


PLUMBING = [  # (kernel, dtype, symmetric, act_order, group)
    ("marlin", torch.float16, True, False, 128), ("marlin", torch.bfloat16, False, False, 64),
    ("marlin", torch.float16, True, True, 128), ("marlin", torch.bfloat16, True, False, -1),
    ("machete", torch.float16, True, False, 128), ("machete", torch.bfloat16, False, False, 64),
    ("machete", torch.float16, False, True, 128), ("machete", torch.bfloat16, True, False, -1),
    ("vllm-exllama", torch.float16, True, False, 128), ("vllm-exllama", torch.float16, False, False, 32),
    ("vllm-exllama", torch.float16, True, True, 64),
]


@pytest.mark.parametrize("name,dtype,symmetric,act_order,g", PLUMBING)
def test_layer_plumbing_over_stand_ins(stand_ins, name, dtype, symmetric, act_order, g):
    k = get_kernel(name)
    w = _weight(256, 512, g, dtype, symmetric=symmetric, act_order=act_order)
    if not symmetric:
        w.zeros[0, 0] = 0  # a zero-point of 0 (v2 and uint4 hold it)
    assert k.rules(w, dtype, (9, 0)) == []
    bias = torch.randn(256, dtype=dtype) * 0.1
    layer = k.build(w, bias)
    assert layer.kernel.startswith("vLLM 0.26.0 ")
    assert ("uint4b8" if symmetric else "uint4") in layer.kernel and (("act-order" in layer.kernel) == act_order)
    ref = w.dequantize(torch.float64)
    u = torch.finfo(dtype).eps
    for m in (1, 5):
        x = torch.randn(3, m, 512, dtype=dtype)  # a 3-D input, as a model's layers get
        y = layer(x)
        assert y.shape == (3, m, 256) and y.dtype == dtype
        want = x.double() @ ref.t() + bias.double()
        assert ((y.double() - want).norm() / want.norm()).item() < 4 * u, (name, m)
    deq = layer.dequantize()  # the identity through the stand-ins: the weight the ops were handed
    assert deq.shape == (256, 512) and ((deq.double() - ref).norm() / ref.norm()).item() < 4 * u
    assert layer.weight_nbytes >= w.qweight.numel()


# -- on a GPU ------------------------------------------------------------------------------------

MS = (1, 16, 128, 512)
CASES = [  # (kernel, dtype, symmetric, act_order)
    *[(k, d, s, False) for k in ("machete", "marlin") for d in (torch.float16, torch.bfloat16) for s in (True, False)],
    ("marlin", torch.float16, True, True),
    ("marlin", torch.bfloat16, True, True),
    ("machete", torch.float16, True, True),
    ("machete", torch.bfloat16, False, True),
    ("vllm-exllama", torch.float16, True, False),
    ("vllm-exllama", torch.float16, False, False),
    ("vllm-exllama", torch.float16, True, True),
]
TOL = 3e-3  # relative Frobenius error of x @ W.T against the float64 product of the layer's own weight
# the layer's own weight against the canonical one: the kernel's dequantization rounds (q - z) * s
# (Machete: q * s + (-z * s)) to the activation dtype
DEQ_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _need(name):
    a = get_kernel(name).available(CUDA)
    if not a.ok:
        if os.environ.get("QB_REQUIRE_VLLM") == "1":
            pytest.fail(f"{name}: {a.reason}")
        pytest.skip(a.reason)
    return get_kernel(name)


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype,symmetric,act_order", CASES,
                         ids=[f"{k}-{str(d)[6:]}-{'sym' if s else 'zp'}{'-actorder' if a else ''}" for k, d, s, a in CASES])
def test_kernel_output_against_float64(name, dtype, symmetric, act_order):
    k = _need(name)
    cap = torch.cuda.get_device_capability()
    for n, kk, g in ((512, 1024, 128), (4096, 4096, 64 if name != "machete" else 128)):
        w = _weight(n, kk, g, dtype, symmetric=symmetric, act_order=act_order, device="cuda")
        rules = k.rules(w, dtype, cap)
        if rules and name == "machete" and cap != (9, 0):
            pytest.skip(rules[0])
        assert k.can_implement(w, CUDA, dtype).ok, rules
        bias = torch.randn(n, device="cuda", dtype=dtype) * 0.1
        layer = k.build(w, bias)
        assert layer.kernel.startswith("vLLM 0.26.0 "), layer.kernel
        deq = layer.dequantize().double().cpu()
        ref_w = w.dequantize(torch.float64).cpu()
        rel_w = ((deq - ref_w).norm() / ref_w.norm()).item()
        assert rel_w < DEQ_TOL[dtype], (name, rel_w)
        deq = deq.cuda()
        for m in MS:
            x = torch.randn(m, kk, device="cuda", dtype=dtype)
            want = x.double() @ deq.t()
            y = layer._mm(x, False)  # the kernel's product alone
            assert y.shape == (m, n) and y.dtype == dtype
            rel = ((y.double() - want).norm() / want.norm()).item()
            assert rel <= TOL, (name, m, rel)
            yb = layer(x)  # with the bias (fused by Marlin, added after by the others: one more rounding)
            rel_b = ((yb.double() - want - bias.double()).norm() / (want + bias.double()).norm()).item()
            assert rel_b <= 2 * TOL, (name, m, rel_b)
        assert layer.weight_nbytes > 0
        del layer
        torch.cuda.synchronize()


@pytest.mark.gpu
def test_type_ids_are_vllms_encoding():
    """The ids read from the installed scalar_type.py are the encoding vLLM's C++ decodes: mantissa
    bits at bit 8, bias at bit 17, NaN representation (IEEE 754 = 1, the default) at bit 50."""
    _need("marlin")
    ids = vo.load().type_ids
    assert ids["uint4"] == (4 << 8) | (1 << 50)
    assert ids["uint4b8"] == (4 << 8) | (8 << 17) | (1 << 50)


@pytest.mark.gpu
def test_gptq_and_awq_backends_choose_vllms_kernel_first():
    for name in ("machete", "marlin"):
        _need(name)
    w = _weight(512, 1024, 128, torch.float16, symmetric=True, device="cuda")
    first = "machete" if torch.cuda.get_device_capability() == (9, 0) else "marlin"
    for backend in ("gptq", "awq"):
        layer = registry.get(backend).from_int4(w, None)
        assert layer.kernel.startswith("vLLM 0.26.0 ") and f" {first}_" in layer.kernel, layer.kernel

"""The warp-K decode tiles of kernels/int4_triton.py (warp_k, DECODE_WARP_K): each K step split
among the program's warps, one slice a warp, as a batched dot summed once after the loop.

Without CUDA the numeric cases run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)
against float64 through the same dequantized weight; the SASS case compiles for sm_90 with no GPU.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from quantbridge.kernels import int4_configs as kc  # noqa: E402
from quantbridge.kernels import int4_layouts as lay  # noqa: E402
from quantbridge.kernels import int4_settings as settings  # noqa: E402
from quantbridge.kernels import int4_triton as kt  # noqa: E402
from quantbridge.kernels import int4_tuner as tn  # noqa: E402
from quantbridge.plugin.packed import quantize_rtn  # noqa: E402
from quantbridge.plugin.spec import QuantSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _layer(n, k, gs, dtype, device, seed, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if act_order else None
    qw = quantize_rtn(w, QuantSpec(group_size=gs), scale_dtype=dtype, perm=perm).to(device)
    return qw, (torch.randn(n, generator=gen) * 0.5).to(device, dtype)


def _rel_to_float64(out, x, qw, b):
    ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_warp_k_marks_only_tiles_of_8_rows():
    """BLOCK_M 8 marks a warp-K tile; every other tuple keeps its meaning (a 16-row tile with a long step
    is the tile over several groups it always was, which operand codes cannot hold)."""
    assert kc.warp_k((8, 16, 512, 1, 4, 3)) == 4 and kc.warp_k((8, 32, 1024, 2, 8, 3)) == 8
    for cfg in [(16, 64, 128, 4, 4, 3), (16, 16, 512, 1, 4, 3), (1, 64, 256, 4, 4, 3), (128, 128, 64, 1, 8, 3),
                (16, 256, 128, 1, kc.WS_WARPS, 6), kc.DEQUANT_CUBLAS]:
        assert kc.warp_k(cfg) == 1, cfg
    assert not kc.operand_config((16, 16, 256, 2, 4, 3), 128)
    # a slice lies inside one group: 4 slices of 128 in groups of 128, not of 64; 4 of 64 in groups of 64
    assert kc.operand_config((8, 16, 512, 1, 4, 3), 128) and not kc.operand_config((8, 16, 512, 1, 4, 3), 64)
    assert kc.operand_config((8, 16, 256, 1, 4, 3), 64) and not kc.operand_config((8, 16, 256, 1, 4, 3), 96)


def test_warp_k_candidates_only_where_asked(monkeypatch):
    """DECODE_WARP_K off (the default): no warp-K candidate and the key as it was; on: warp-K tiles at
    M <= 8 on operand codes only, each a valid operand configuration, and the key says so (-wk)."""
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    args = (4096, 4096, 128, torch.bfloat16, "operand-tiled", 1)
    off = {m: kc.candidate_configs(m, 4096, 4096, 128, "operand-tiled") for m in (1, 16, 64)}
    key_off = tn.tuner_key(1, *args)
    assert not any(kc.warp_k(c) > 1 for cs in off.values() for c in cs)
    monkeypatch.setattr(settings, "DECODE_WARP_K", True)
    for m in (1, 4, 8):
        wk = [c for c in kc.candidate_configs(m, 4096, 4096, 128, "operand-tiled") if kc.warp_k(c) > 1]
        assert wk and all(kc.operand_config(c, 128) for c in wk), m
        assert {c[1] for c in wk} == {16, 32, 64} and {c[4] for c in wk} == {4, 8}
    assert kc.candidate_configs(16, 4096, 4096, 128, "operand-tiled") == off[16]
    assert kc.candidate_configs(64, 4096, 4096, 128, "operand-tiled") == off[64]
    assert not any(kc.warp_k(c) > 1 for c in kc.candidate_configs(1, 4096, 4096, 128, "canonical"))
    assert tn.tuner_key(1, *args) == key_off + "-wk" and "-wk" not in tn.tuner_key(16, *args)
    # K split over programs only where the split before left fewer than two programs an SM
    assert {c[3] for c in kc.warp_k_configs(28672, 8192, 128, 132)} == {1}
    small = kc.warp_k_configs(4096, 4096, 128, 132)
    assert {c[3] for c in small if c[1] == 16} == {1, 2} and {c[3] for c in small if c[1] == 64} == {1, 2, 4}
    assert {c[3] for c in kc.warp_k_configs(4096, 4096, 128, None)} == {1}
    assert {c[2] // c[4] for c in kc.warp_k_configs(4096, 4096, 64, 132)} == {64}  # slices inside groups of 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_warp_k_tile_refuses_canonical_codes():
    qw, _ = _layer(64, 512, 128, torch.float32, "cpu", seed=3)
    with pytest.raises(ValueError, match="operand codes only"):
        kt.launch(torch.randn(2, 512), qw, torch.empty(2, 64), (8, 16, 512, 1, 4, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(8, 16, 512, 1, 4, 3), (8, 32, 512, 2, 4, 3), (8, 16, 1024, 1, 8, 3),
                                 (8, 64, 512, 2, 4, 3)])
@pytest.mark.parametrize("sz", ["packed", "split", "apart"])
def test_interpreter_warp_k_bound_layer_matches_reference(cfg, sz, monkeypatch):
    """A bound operand-tiled layer through a warp-K tile: M = 1, 3, 8 and 13 (two tiles of x), a K that is whole steps
    (1024) and one that is not (1280: the last step's upper slices past K, masked, with their scales),
    split over one or two programs, scales packed as [N, groups] words, split words or read apart;
    act-order and bias; within 3e-3 of float64 through the same dequantized weight (fp16 activations)."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    monkeypatch.setattr(settings, "OPERAND_TILED", True)
    monkeypatch.setattr(settings, "SZ_SPLIT", sz == "split")
    monkeypatch.setattr(settings, "SCALES_PACKED", sz != "apart")
    gen = torch.Generator().manual_seed(cfg[1] + cfg[2])
    for k in (1024, 1280):
        qw, b = _layer(128, k, 128, torch.float16, "cpu", seed=k + cfg[4], act_order=True)
        bound = kt.BoundLinear(qw, b, config=cfg)
        assert bound.layout == "operand-tiled" and (bound._sz is None) == (sz == "apart")
        for m in (1, 3, 8, 13):
            x = torch.randn(m, k, generator=gen).to(torch.float16)
            assert _rel_to_float64(bound(x), x, qw, b) < 3e-3, (k, m)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_warp_k_tile_in_groups_of_64():
    """Slices of 64 columns where the group is 64 (a step of 256 on 4 warps), row-major operand codes."""
    qw, b = _layer(80, 640, 64, torch.float16, "cpu", seed=11)
    laid = replace(qw, qweight=lay.to_operand(qw.qweight))
    x = torch.randn(5, 640, generator=torch.Generator().manual_seed(12)).to(torch.float16)
    out = torch.empty(5, 80, dtype=torch.float16)
    old = settings.CODE_MODE
    settings.CODE_MODE = "operand"
    try:
        kt.launch(x, laid, out, (8, 16, 256, 1, 4, 3), bias=b, layout="operand")
    finally:
        settings.CODE_MODE = old
    assert _rel_to_float64(out, x, qw, b) < 3e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_warp_k_tile_multiplies_on_tensor_cores_without_spilling():
    """Compiled for sm_90 (no GPU): a warp-K tile's K loop runs mma.sync (HMMA; a batched dot is not
    wgmma), one m16n8k16 per 16 columns of its warp's slice (8 rows of x: the n8), stores nothing to shared memory (with
    K in canonical order Triton took the dequantized operand through it: 8 STS a step; k4_order keeps it
    in the registers it was unpacked in), and ptxas spills nothing."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("this Triton has no bundled nvdisasm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_counts.py"), "--modes", "operand",
                        "--config", "8,16,512,1,4,3", "--count", "HMMA,HGMMA,STS", "--ptxas"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    loop = next(ln for ln in lines if ln.startswith("(8, 16, 512"))
    assert "[HMMA: 8]" in loop and "[HGMMA: 0]" in loop and "[STS: 0]" in loop, loop
    assert any("ptxas:" in ln and "no performance warning" in ln for ln in lines), lines


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_warp_k_bound_layer_matches_reference(dtype):
    """On the GPU: the warp-K tiles of a 4096x4096 layer (each row count and warp count over the whole
    of K, and the split runs of 64 rows) within 3e-3 of float64, M = 1, 4, 8 and 16 (two tiles of x), in a
    CUDA graph too (the
    split runs' counters left zeroed for the next replay)."""
    qw, b = _layer(4096, 4096, 128, dtype, "cuda", seed=7)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cfg in [c for c in kc.warp_k_configs(4096, 4096, 128, sms) if c[3] == 1 or (c[1] == 64 and c[4] == 8)]:
        bound = kt.BoundLinear(qw, b, config=cfg)
        for m in (1, 4, 8, 16):
            x = torch.randn(m, 4096, device="cuda", dtype=dtype)
            assert _rel_to_float64(bound(x), x, qw, b) < 3e-3, (cfg, m)
        static = torch.randn(4, 4096, device="cuda", dtype=dtype)
        bound(static)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = bound(static)
        for _ in range(2):
            static.copy_(torch.randn(4, 4096, device="cuda", dtype=dtype))
            g.replay()
            assert _rel_to_float64(y, static, qw, b) < 3e-3, cfg


def test_precompile_compiles_the_warp_k_tiles_for_their_variant_only(monkeypatch):
    """precompile_triton lists a mode's candidates under its own settings: the warp-K tiles for the
    "-warpk" variant and not for r11's default beside it; the module setting restored after."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_variants as kv
    import precompile_triton as pre

    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    base = "operand-tiled-ws-fixup16-loads4-sliced-fast"
    assert kv.VARIANTS[base + "-warpk"] == {**kv.VARIANTS[base], "DECODE_WARP_K": True}
    jobs = pre._jobs([(4096, 4096)], [1, 16], ["bf16"], 128, [base, base + "-warpk"])
    assert {mode for mb, cfg, dt, mode in jobs if kc.warp_k(cfg) > 1} == {base + "-warpk"}
    assert settings.DECODE_WARP_K is False

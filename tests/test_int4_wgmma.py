"""The warp-specialized Hopper tile (kernels/int4_wgmma.py): numerics on an sm_90 GPU against float64,
its place in the tuner's search space, and, without a GPU, what the compiler makes of it for sm_90.

Gluon has no interpreter, so the numeric tests need the GPU (`-m gpu`); the SASS tests compile the
kernel for sm_90 on any machine (with Triton's bundled ptxas and nvdisasm).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from quantbridge.kernels import int4_configs as kc  # noqa: E402
from quantbridge.kernels import int4_settings as settings  # noqa: E402
from quantbridge.kernels import int4_triton as kt  # noqa: E402
from quantbridge.kernels import int4_tuner as tn  # noqa: E402
from quantbridge.kernels import int4_wgmma as ws  # noqa: E402
from quantbridge.plugin.packed import quantize_rtn  # noqa: E402
from quantbridge.plugin.spec import QuantSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
needs_gluon = pytest.mark.skipif(ws.gluon is None, reason="this Triton has no Gluon")


def _case(n, k, gs, dtype, bias, seed, sym=False):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_rtn(torch.randn(n, k, generator=gen), QuantSpec(group_size=gs, symmetric=sym), scale_dtype=dtype)
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype) if bias else None
    return qw, b, gen


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_configs_fit_shared_memory_and_the_shape():
    for m in (1, 16, 64, 128, 256, 512, 4096):
        got = ws.configs(m, 28672, 8192, 128)
        assert got and all(ws.smem_bytes(c) <= ws.SMEM_LIMIT and c[0] <= max(m, 16) for c in got), (m, got)
    assert ws.configs(32, 28672, 8192, 128) == []  # between the decode tiles and the tensor-core ones
    assert ws.configs(16, 28672, 8192, 128) == ws.configs(1, 28672, 8192, 128) == [(16, 128, 8), (16, 256, 6)]
    assert ws.configs(128, 28672, 8192, 64) == []  # groups smaller than a step
    assert all(c[1] == 128 for c in ws.configs(128, 128 * 3, 8192, 128))  # N = 384: no 256-row tiles
    assert ws.configs(128, 4096, 4000, 128) == []  # K not whole 128-column steps


def test_tuner_offers_them_on_operand_tiled_layers_only_when_asked(monkeypatch):
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    monkeypatch.setattr(kc, "ws_module", lambda: ws)  # as on an H100
    got = [c for c in kc.candidate_configs(128, 28672, 8192, 128, "operand-tiled") if kc.is_ws(c)]
    # whole tiles, and stream-K over one program per SM where the tiles leave a last wave part-empty
    assert got == [(128, 128, 128, 1, 12, 4), (128, 128, 128, -132, 12, 4), (128, 256, 128, 1, 12, 3),
                   (128, 256, 128, -132, 12, 3)]
    monkeypatch.setattr(kc, "_sm_count", lambda: 112)  # 112 tiles of 128x256: whole tiles only
    assert (128, 256, 128, -112, 12, 3) not in kc.candidate_configs(128, 28672, 8192, 128, "operand-tiled")
    assert not any(kc.is_ws(c) for c in kc.candidate_configs(128, 28672, 8192, 128, "operand"))  # row-major codes
    assert not any(kc.is_ws(c) for c in kc.candidate_configs(32, 28672, 8192, 128, "operand-tiled"))
    # decode: 16-row tiles on deep rings, whole (224 or 112 tiles) and stream-K over one program per SM,
    # only when asked (WGMMA_WS_DECODE: not yet timed on a GPU)
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    assert not any(kc.is_ws(c) for c in kc.candidate_configs(1, 28672, 8192, 128, "operand-tiled"))
    monkeypatch.setattr(settings, "WGMMA_WS_DECODE", True)
    assert [c for c in kc.candidate_configs(1, 28672, 8192, 128, "operand-tiled") if kc.is_ws(c)] == [
        (16, 128, 128, 1, 12, 8), (16, 128, 128, -132, 12, 8), (16, 256, 128, 1, 12, 6), (16, 256, 128, -132, 12, 6)]
    assert not kc.is_ws(kc.DEQUANT_CUBLAS)


def test_few_tiles_get_runs_that_split_each_tiles_k(monkeypatch):
    """A layer with fewer ws tiles than half the SMs also gets stream-K on tiles x s programs, s
    dividing its K steps, between half and twice the SMs: every run inside one tile, s parts a tile.
    A layer of many tiles gets none of them."""
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    monkeypatch.setattr(kc, "ws_module", lambda: ws)
    got = [c for c in kc.candidate_configs(512, 1024, 4096, 128, "operand-tiled") if kc.is_ws(c)]
    for c in got:
        count, k_steps = ws.tiles(512, 1024, (c[0], c[1], c[5])), 4096 // 128
        if c[3] < 0 and -c[3] != 132:
            assert -c[3] % count == 0 and k_steps % (-c[3] // count) == 0 and 66 <= -c[3] <= 264, c
    # 32 tiles of 128x128 (s = 4 and 8) and 16 of 128x256 and of 256x128 (s = 8 and 16)
    assert {(c[0], c[1], -c[3]) for c in got if c[3] < 0 and c[3] != -132} == {
        (128, 128, 128), (128, 128, 256), (128, 256, 128), (128, 256, 256), (256, 128, 128), (256, 128, 256)}
    assert all(c[3] in (1, -132) for c in kc.candidate_configs(128, 28672, 8192, 128, "operand-tiled") if kc.is_ws(c))
    monkeypatch.setattr(settings, "STREAM_K", False)
    assert all(c[3] == 1 for c in kc.candidate_configs(512, 1024, 4096, 128, "operand-tiled") if kc.is_ws(c))


def test_the_ab_setting_turns_them_off(monkeypatch):
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    monkeypatch.setattr(settings, "WGMMA_WS", False)
    assert kc.ws_module() is None
    assert not any(kc.is_ws(c) for c in kc.candidate_configs(128, 28672, 8192, 128, "operand-tiled"))


def test_a_ws_config_is_refused_where_it_cannot_read_the_weight(monkeypatch):
    qw, _, _ = _case(128, 256, 128, torch.float32, False, seed=3)
    with pytest.raises(ValueError, match="warp-specialized Hopper tile"):
        kt.launch(torch.randn(64, 256), qw, torch.empty(64, 128), (64, 128, 128, 1, kc.WS_WARPS, 4))


def test_env_says_whether_the_native_kernel_gets_these_tiles(monkeypatch):
    from quantbridge.plugin.kernel import get_kernel

    triton_kernel = get_kernel("triton")
    for hopper, want in ((True, "with the warp-specialized"), (False, "without (they need an sm_90 GPU and Gluon)")):
        monkeypatch.setattr(ws, "available", lambda hopper=hopper: hopper)
        got = triton_kernel.available(torch.device("cuda"))
        assert got.ok and want in got.reason, got.reason
    monkeypatch.setattr(settings, "WGMMA_WS", False)  # the A/B setting off: not offered, whatever the GPU
    assert "without" in triton_kernel.available(torch.device("cuda")).reason


def _sass_lines(cfg: str, *flags: str) -> list[str]:
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("this Triton has no bundled nvdisasm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_counts.py"), "--ws", cfg, "--ptxas", *flags],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_keeps_the_wgmma_asynchronous_and_the_weight_in_registers():
    """Per K step of 128: two m64 wgmma per 32-column chunk with the weight from registers (16-bit A
    operands, no shared-memory round trip of the dequantized tile), a wait before each chunk that
    leaves three groups in flight, and ptxas's verdict that nothing serializes them (C7515, which the
    zeroed accumulator on a zero-trip path caused before the loop was declared non-empty)."""
    for cfg, per_step in (("128,128,4", 8), ("128,256,3", 16)):
        lines = _sass_lines(cfg)
        loop = next(ln for ln in lines if ln.startswith("loop"))
        assert f"HGMMA: {per_step}" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop
        assert any("ptxas:" in ln and "serialized" not in ln for ln in lines), lines


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_a_release_next_to_the_wait_shares_its_barrier():
    """Gluon puts a barrier of all consumer threads before each stage's wait and around each release:
    three a step when a stage is freed at the next step's fourth chunk (RELEASE_LAG 1), two when it is
    freed one step later just before the wait (2); the wgmma and their waits stay as they were."""
    for lag, bars in ((1, 3), (2, 2)):
        lines = _sass_lines("128,128,4", "--release-lag", str(lag), "--count", "HGMMA,WARPGROUP.DEPBAR.LE,BAR")
        loop = next(ln for ln in lines if ln.startswith("loop"))
        assert "HGMMA: 8" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and f"BAR: {bars}]" in loop, (lag, loop)
        assert any("ptxas:" in ln and "serialized" not in ln for ln in lines), lines


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gs", [128, -1])  # -1: one group per row (K columns, several steps a group)
def test_gpu_ws_tiles_match_float64(dtype, gs):
    """Every tile, whole and stream-K, M below, at and above BLOCK_M (the tail rows masked), bias or not,
    asymmetric and symmetric codes, groups of 128 and one per row: within 3e-3 of float64 through the
    weight as the kernel dequantizes it."""
    _check_tiles(dtype, gs, ((512, 1024, False, True), (768, 2048, True, False)))


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_fixup_in_row_chunks_leaves_the_k_loop_as_it_was():
    """FIXUP_ROWS changes only what follows a stream-K run: summed whole (0, the A/B variant; the
    other SASS tests compile the default), the K loop keeps its wgmma, waits and no shared-memory
    stores, and ptxas serializes nothing."""
    lines = _sass_lines("128,256,3", "--fixup-rows", "0")
    loop = next(ln for ln in lines if ln.startswith("loop"))
    assert "HGMMA: 16" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop
    assert any("ptxas:" in ln and "serialized" not in ln for ln in lines), lines


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_fixup_loads_go_out_before_the_adds(monkeypatch):
    """FIXUP_LOADS 4 (the default): in the row-chunk fix-up the four parts' loads (ld.global.cg) are issued
    before their adds, where with 1 (the A/B variant) each part's load waits on the last add; with 1 the K
    loop keeps its wgmma too (the other SASS tests compile the default)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    for loads in (1, 4):
        monkeypatch.setattr(settings, "FIXUP_LOADS", loads)
        sass = sass_counts.compile_ws((128, 128, 4))[0]
        seq = "".join("L" if "LDG" in ln else "A" for ln in sass.splitlines() if "LDG" in ln or "FADD" in ln)
        # the fix-up's chunk: its loads (two 16-byte loads a part a thread), then its adds
        assert ("L" * 8 + "A" * 32 in seq) == (loads == 4), (loads, seq)
    lines = _sass_lines("128,256,3", "--fixup-loads", "1")
    loop = next(ln for ln in lines if ln.startswith("loop"))
    assert "HGMMA: 16" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("rows,loads", [(0, 1), (8, 1), (16, 1)])  # the default (16, 4) runs in every other ws test
def test_gpu_ws_tiles_fixup_in_row_chunks(rows, loads, monkeypatch):
    """Stream-K parts summed whole (FIXUP_ROWS 0, the A/B variant) or stored for the rows of x only
    and summed 8 or 16 rows at a time, one part's loads at a time (FIXUP_LOADS 1, the A/B variant; the
    default 4, its last group masked where the parts run out, is every other ws test's): the same tiles,
    M below, at and above BLOCK_M (tail rows masked in the parts and the output), bias or not, within
    3e-3 of float64."""
    monkeypatch.setattr(settings, "FIXUP_ROWS", rows)
    monkeypatch.setattr(settings, "FIXUP_LOADS", loads)
    _check_tiles(torch.bfloat16, 128, ((512, 1024, False, True), (768, 2048, True, False)))


def test_split_runs_are_summed_in_slices_only_where_every_program_is_resident(monkeypatch):
    """FIXUP_SLICED applies to split runs (each tile's K in s >= 2 equal runs, one a program) of no
    more programs than SMs, with the row-chunk fix-up; any other launch keeps the last-arriver sum."""
    monkeypatch.setattr(settings, "FIXUP_SLICED", True)
    cfg = (128, 128, 4)  # 4096x1024 at M=512: 32 tiles, 32 K steps
    assert ws.sums_sliced(512, 1024, 4096, cfg, 128, 132)  # s = 4
    assert ws.sums_sliced(100, 1024, 4096, cfg, 16, 132)  # 8 tiles, s = 2
    assert ws.sums_sliced(512, 1024, 4096, cfg, 96, 132)  # s = 3: unequal runs, each still in one tile
    assert not ws.sums_sliced(512, 1024, 4096, cfg, 256, 132)  # more programs than SMs: not all resident
    assert not ws.sums_sliced(512, 1024, 4096, cfg, 40, 132)  # not a multiple of the tiles: runs cross
    assert not ws.sums_sliced(16, 1024, 256, cfg, 24, 132)  # s = 3 over 2 K steps: a run would be empty
    assert not ws.sums_sliced(16, 1024, 4096, cfg, 16, 132)  # one row chunk (M <= 16): nothing to share
    assert not ws.sums_sliced(512, 1024, 4096, cfg, 32, 132)  # s = 1: whole tiles, no parts
    assert not ws.sums_sliced(512, 1024, 4096, cfg, None, 132)
    monkeypatch.setattr(settings, "FIXUP_ROWS", 0)
    assert not ws.sums_sliced(512, 1024, 4096, cfg, 128, 132)  # parts summed whole: the last arriver's
    monkeypatch.setattr(settings, "FIXUP_ROWS", 16)
    monkeypatch.setattr(settings, "FIXUP_SLICED", False)
    assert not ws.sums_sliced(512, 1024, 4096, cfg, 128, 132)


@pytest.mark.parametrize("tiles,steps,s", [(32, 32, 4), (8, 16, 2), (32, 32, 3), (5, 7, 7), (3, 112, 5)])
def test_split_runs_each_lie_in_one_tile_with_the_owners_the_kernel_computes(tiles, steps, s):
    """What sums_sliced relies on, with the kernel's own formulas (_run_of; p_lo, p_hi in _consumer):
    over tiles x s programs every run is non-empty and inside one tile a, whose owners are programs
    a*s .. a*s + s - 1, so each program's slice index pid - p_lo is 0 .. s - 1."""
    units, p = tiles * steps, tiles * s
    for pid in range(p):
        u0, u1 = pid * units // p, (pid + 1) * units // p
        a = u0 // steps
        assert u1 > u0 and (u1 - 1) // steps == a, (pid, u0, u1)
        t0 = a * steps
        p_lo = ((t0 + 1) * p + units - 1) // units - 1
        p_hi = ((t0 + steps) * p + units - 1) // units - 1
        assert (p_lo, p_hi) == (a * s, a * s + s - 1) and 0 <= pid - p_lo < s


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_sliced_fixup_polls_with_an_acquire_load_and_leaves_the_k_loop(monkeypatch):
    """The sliced sum waits on the tile's counter with an acquire load (a poll, not an atomic add of 0)
    and adds one more relaxed increment; every other launch has neither. The K loop keeps its wgmma and waits."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    for sliced in (False, True):
        ptx = sass_counts.compile_ws((128, 128, 4), sliced=sliced)[1]
        assert ("ld.global.gpu.acquire.b32" in ptx) == sliced
        assert ptx.count("atom.global.gpu.relaxed.add") == int(sliced)
        assert ptx.count("atom.global.gpu.acq_rel.add") == 1  # the arrival, either way
    lines = _sass_lines("128,128,4", "--fixup-sliced")
    loop = next(ln for ln in lines if ln.startswith("loop"))
    assert "HGMMA: 8" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop
    assert any("ptxas:" in ln and "serialized" not in ln for ln in lines), lines


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_ws_split_runs_summed_in_slices(monkeypatch):
    """FIXUP_SLICED: every tile within 3e-3 of float64 (split runs at M <= BLOCK_M summed in slices,
    other runs as before), and split runs of 2, 3 and 4 programs a tile bit for bit the output of the
    last program summing alone (the same parts added in the same order) in each of several launches
    back to back on fresh inputs, and in replays of a CUDA graph holding the (cooperative) launch,
    counters left zeroed after each."""
    monkeypatch.setattr(settings, "FIXUP_SLICED", True)
    _check_tiles(torch.bfloat16, 128, ((512, 1024, False, True),))
    qw, b, gen = _case(1024, 2048, 128, torch.bfloat16, True, seed=11)
    qw, b = qw.to("cuda"), b.to("cuda")
    for s in (2, 3, 4):
        for m in (128, 100):
            cfg = (128, 128, 128, -s * ws.tiles(m, 1024, (128, 128, 4)), kc.WS_WARPS, 4)
            bound = {}
            x = torch.randn(m, 2048, generator=gen).to("cuda", torch.bfloat16)
            for sliced in (True, False):  # a layer each, its plan made (first call) under its setting
                monkeypatch.setattr(settings, "FIXUP_SLICED", sliced)
                assert ws.sums_sliced(m, 1024, 2048, (128, 128, 4), -cfg[3], 132) == sliced
                bound[sliced] = kt.BoundLinear(qw, b, config=cfg)
                bound[sliced](x)
            for _ in range(3):  # the plans' launches, back to back
                x = torch.randn(m, 2048, generator=gen).to("cuda", torch.bfloat16)
                outs = [bound[sliced](x) for sliced in (True, False)]
                assert torch.equal(outs[0], outs[1]), (s, m)
                assert not any(bound[sliced].plans[m].counters.any() for sliced in (True, False))
    # captured in a CUDA graph, as a served model runs it: the cooperative launch as a graph node
    static = torch.randn(128, 2048, generator=gen).to("cuda", torch.bfloat16)
    cfg = (128, 128, 128, -4 * ws.tiles(128, 1024, (128, 128, 4)), kc.WS_WARPS, 4)
    monkeypatch.setattr(settings, "FIXUP_SLICED", True)
    sliced_layer = kt.BoundLinear(qw, b, config=cfg)
    sliced_layer(static)  # first call: compile and plan outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sliced_layer(static)
    monkeypatch.setattr(settings, "FIXUP_SLICED", False)
    alone = kt.BoundLinear(qw, b, config=cfg)
    for _ in range(2):
        static.copy_(torch.randn(128, 2048, generator=gen).to("cuda", torch.bfloat16))
        g.replay()
        assert torch.equal(y, alone(static))
        assert not sliced_layer.plans[128].counters.any()


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_split_scales_leave_the_k_loop_asynchronous():
    """The split scale and zero-point words (int4_settings.SZ_SPLIT: two loads a step, not one) change
    only how a step's scales are read: the K loop keeps its wgmma, waits and no shared-memory stores,
    and ptxas serializes nothing."""
    lines = _sass_lines("128,256,3", "--sz-split")
    loop = next(ln for ln in lines if ln.startswith("loop"))
    assert "HGMMA: 16" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop
    assert any("ptxas:" in ln and "serialized" not in ln for ln in lines), lines


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_ws_tiles_read_split_scales(monkeypatch):
    """Scales and zero points in split group-major words (int4_settings.SZ_SPLIT), five groups (a ragged
    last word of each kind) and sixteen: every tile, whole and stream-K, within 3e-3 of float64."""
    monkeypatch.setattr(settings, "SZ_SPLIT", True)
    _check_tiles(torch.bfloat16, 128, ((512, 640, False, True), (768, 2048, True, False)))


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_ws_tiles_release_lag_2(monkeypatch):
    """The stages freed one step later (RELEASE_LAG 2): the same tiles, whole and stream-K (runs of one
    step and runs crossing tiles free their stages at the tile's end), within 3e-3 of float64."""
    monkeypatch.setattr(settings, "RELEASE_LAG", 2)
    _check_tiles(torch.bfloat16, 128, ((512, 1024, False, True),))


def _check_tiles(dtype: torch.dtype, gs: int, cases) -> None:
    for n, k, sym, bias in cases:
        qw, b, gen = _case(n, k, gs, dtype, bias, seed=n + gs, sym=sym)
        qw, b = qw.to("cuda"), None if b is None else b.to("cuda")
        # the weight as the kernel multiplies it: (q - z) * s rounded once to the dtype (the issue's
        # "float64 product of the kernel's own dequantized weight"; bf16 rounding of the weight alone
        # put one M=1 row at 3.1e-3 against the unrounded one)
        w_kernel = qw.dequantize_stored(dtype).double()
        tiles = ws.configs(512, n, k, qw.group_size) + ws.configs(16, n, k, qw.group_size)
        assert len(tiles) == 5
        for bm, bn, st in tiles:
            # whole tiles, stream-K over 5 programs (runs that cross tiles, tiles shared by 2-3 runs),
            # and over twice the tiles at M = BLOCK_M (each tile's K in two runs, as the tuner offers
            # layers of few tiles; other M: runs that cross tiles again)
            for sk in (1, -5, -2 * ws.tiles(bm, n, (bm, bn, st))):
                bound = kt.BoundLinear(qw, b, config=(bm, bn, 128, sk, kc.WS_WARPS, st))
                assert bound.layout == "operand-tiled" and bound._sz is not None
                for m in (1, bm - 5, bm, bm + 7, 3 * bm):
                    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
                    ref = x.double() @ w_kernel.T + (0 if b is None else b.double())
                    out = bound(x)
                    assert _rel(out, ref) < 3e-3, (bm, bn, st, sk, m, dtype, gs)
                    if sk < 0:  # the tile counters are left zeroed for the next launch
                        assert not bound.plans[m].counters.any()


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_ws_tile_in_a_cuda_graph_reads_each_replays_input():
    qw, b, gen = _case(1024, 4096, 128, torch.bfloat16, True, seed=9)
    qw, b = qw.to("cuda"), b.to("cuda")
    bound = kt.BoundLinear(qw, b, config=(128, 128, 128, -3, kc.WS_WARPS, 4))
    static = torch.randn(200, 4096, generator=gen).to("cuda", torch.bfloat16)
    bound(static)  # first call: compile and plan outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = bound(static)
    for seed in (1, 2):
        static.copy_(torch.randn(200, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        g.replay()
        want = static.double() @ qw.dequantize(torch.float64).T + b.double()
        assert _rel(y, want) < 3e-3


def test_launch_key_tells_apart_what_triton_specializes_on():
    """The fast launch reuses a compiled kernel only for arguments Triton would have compiled the same
    kernel for: the same constexprs and BLOCK_M, pointers alike in element type and 16-byte alignment,
    integers alike in being 1, a multiple of 16 and 32-bit."""
    buf = torch.empty(64, dtype=torch.int32)
    consts = (True, 1, 128.0, 128, 4, 3, 1, 16, 4, False, False, 1, 8)
    key = ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf[4:]), (200, 4096, 32))
    assert key == ws.launch_key(0, torch.bfloat16, 128, consts, (buf[8:], buf[12:]), (184, 8192, 48))
    others = [
        ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf[1:]), (200, 4096, 32)),  # 4-byte aligned
        ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf.view(torch.float32)), (200, 4096, 32)),  # fp32 ptr
        ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf[4:]), (208, 4096, 32)),  # M a multiple of 16
        ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf[4:]), (1, 4096, 32)),  # M = 1
        ws.launch_key(0, torch.bfloat16, 128, consts, (buf, buf[4:]), (200, 2**31, 32)),  # 64-bit
        ws.launch_key(0, torch.float16, 128, consts, (buf, buf[4:]), (200, 4096, 32)),
        ws.launch_key(0, torch.bfloat16, 64, consts, (buf, buf[4:]), (200, 4096, 32)),
        ws.launch_key(0, torch.bfloat16, 128, consts[:-3] + (2, 4), (buf, buf[4:]), (200, 4096, 32))[:4],
        ws.launch_key(1, torch.bfloat16, 128, consts, (buf, buf[4:]), (200, 4096, 32)),
    ]
    assert all(o != key for o in others)


@needs_gluon
def test_fast_launch_passes_the_constexprs_in_the_kernels_order():
    """The fast launch hands the compiled kernel its arguments positionally: its constexpr names must be
    the kernel's last parameters, in order, after the 13 runtime ones."""
    names = ws._int4_ws_kernel.arg_names
    assert tuple(names[-len(ws._CONSTEXPRS):]) == ws._CONSTEXPRS and len(names) == 13 + len(ws._CONSTEXPRS)


class _CountingKernel:
    """Stands in for the Gluon kernel: counts launches through Gluon's own path."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fast_launch_is_gluons_launch_bit_for_bit(dtype, monkeypatch):
    """FAST_LAUNCH: after the first launch of a specialization, launches skip Gluon's binder (none
    reaches it) and give the output of launches through it bit for bit, whole tiles and stream-K, M of
    every specialization class, on fresh inputs; inside a CUDA graph too. A layer's later calls at an
    M go through its bound plan (int4_wgmma.BoundLaunch). FAST_LAUNCH False: every launch goes
    through Gluon."""
    counting = _CountingKernel(ws._int4_ws_kernel)
    monkeypatch.setattr(ws, "_int4_ws_kernel", counting)
    monkeypatch.setattr(ws, "_COMPILED", {})
    qw, b, gen = _case(768, 2048, 128, dtype, True, seed=23)
    qw, b = qw.to("cuda"), b.to("cuda")
    for cfg in ((128, 128, 128, 1, kc.WS_WARPS, 4), (128, 128, 128, -5, kc.WS_WARPS, 4),
                (64, 256, 128, -12, kc.WS_WARPS, 3)):
        bound = {}
        for fast in (True, False):
            monkeypatch.setattr(settings, "FAST_LAUNCH", fast)
            bound[fast] = kt.BoundLinear(qw, b, config=cfg)
        for m in (1, 37, 64, 200):  # 200 is 37's class: its first launch is already fast
            for step in range(3):
                x = torch.randn(m, 2048, generator=gen).to("cuda", dtype)
                outs = {}
                for fast in (True, False):
                    monkeypatch.setattr(settings, "FAST_LAUNCH", fast)
                    before, known = counting.calls, len(ws._COMPILED)
                    outs[fast] = bound[fast](x)
                    # Gluon's path: every launch without the fast path; with it, only a launch of a
                    # specialization not seen before (which the fast path then keeps)
                    went = counting.calls - before
                    assert went == (len(ws._COMPILED) - known if fast else 1), (cfg, m, step, fast)
                    assert not (fast and step and went), (cfg, m, step)
                assert torch.equal(outs[True], outs[False]), (cfg, m, step)  # step >= 1: the bound plan's
                # the fast side's later calls went through its bound plan (int4_wgmma.BoundLaunch)
                assert bound[True].plans[m].bound is not None and bound[False].plans[m].bound is None, (cfg, m)
    monkeypatch.setattr(settings, "FAST_LAUNCH", True)
    layer = kt.BoundLinear(qw, b, config=(128, 128, 128, -5, kc.WS_WARPS, 4))
    static = torch.randn(96, 2048, generator=gen).to("cuda", dtype)
    layer(static)
    calls = counting.calls
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(static)
    assert counting.calls == calls  # captured through the fast path
    for _ in range(2):
        static.copy_(torch.randn(96, 2048, generator=gen).to("cuda", dtype))
        g.replay()
        assert torch.equal(y, layer(static))


class _FakeRun:
    """Stands in for Triton 3.6's CudaLauncher around Triton's own descriptor wrapper, whose C entry
    point records what it is given."""

    num_ctas, global_scratch_size, profile_scratch_size = 1, 0, 0
    launch_cooperative_grid, launch_pdl = False, False

    def __init__(self, signature, metas, calls):
        from triton.backends.nvidia.driver import wrap_handle_tensordesc

        self.launch = wrap_handle_tensordesc(lambda *args: calls.append(args), signature, metas)

    def __call__(self, gx, gy, gz, stream, function, *args):  # CudaLauncher.__call__, no scratch
        self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None, *args)


@needs_gluon
@pytest.mark.parametrize("bias,programs", [(True, None), (False, 12)])
def test_bound_launch_hands_the_c_launcher_what_tritons_wrapper_does(bias, programs, monkeypatch):
    """int4_wgmma.BoundLaunch calls the compiled launcher's C entry itself, the codes' TMA descriptor
    encoded once and x's per call: every argument must be what Triton's own descriptor wrapper (its
    make_tensordesc_arg) hands it for the same launch through run_compiled, in order, for a later x
    and out at other addresses too (tensors compared by address; the driver's encode recorded)."""
    from types import SimpleNamespace

    from quantbridge.kernels import _fast_launch

    if not triton.__version__.startswith("3.6."):
        pytest.skip("the bound launch is written against Triton 3.6's launcher")
    fills = lambda *a: ("map", a[0], a[1], a[2], a[3], tuple(a[4]), tuple(a[5]), tuple(a[6]), a[7])  # noqa: E731
    fake = SimpleNamespace(utils=SimpleNamespace(fill_tma_descriptor=fills), get_current_stream=lambda i: 77)
    monkeypatch.setattr(_fast_launch.driver, "_active", fake)
    monkeypatch.setattr(_fast_launch, "_INTERPRET", False)  # CPU test runs set TRITON_INTERPRET
    monkeypatch.setattr(ws, "sm_count", lambda i: 132)
    monkeypatch.setattr(settings, "FAST_LAUNCH", True)
    m, n, k, group, cfg = 96, 256, 512, 128, (64, 128, 4)
    metas = [{"swizzle": 3, "elem_size": 2, "elem_type": 10, "block_size": [64, 128], "fp4_padded": False},
             {"swizzle": 1, "elem_size": 4, "elem_type": 3, "block_size": [64, 16], "fp4_padded": False}]
    names = ws._int4_ws_kernel.arg_names
    signature = {name: ("tensordesc<bf16[64, 128]>" if i == 0 else "tensordesc<i32[64, 16]>" if i == 1
                        else "constexpr" if name in ws._CONSTEXPRS else "*i32" if i < 7 else "i32")
                 for i, name in enumerate(names)}
    calls = []
    kernel = SimpleNamespace(run=_FakeRun(signature, metas, calls), function=4321, packed_metadata=("meta",))
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    sz = torch.randint(0, 2**31 - 1, (n, k // group), generator=gen, dtype=torch.int32)
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    wsp = torch.empty(2 * 12 * 64 * 128) if programs else None
    cnt = torch.zeros(ws.counter_count(m, n, cfg), dtype=torch.int32) if programs else None
    x, out = torch.randn(m, k, generator=gen).to(torch.bfloat16), torch.empty(m, n, dtype=torch.bfloat16)
    bound = ws.bind(kernel, x, codes, sz, out, cfg, group, b, programs, wsp, cnt)
    assert bound is not None
    by_address = lambda args: tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    for x_, out_ in ((x, out), (torch.randn(m, k, generator=gen).to(torch.bfloat16), torch.empty_like(out))):
        p, ints, consts, _ = ws._arguments(x_, sz, out_, cfg, group, b, programs, wsp, cnt)
        ptrs = (sz, out_, out_ if b is None else b, out_ if wsp is None else wsp, sz if cnt is None else cnt)
        ws.run_compiled(kernel, (p, 1, 1), 0, (*ws.descriptors(x_, codes, cfg), *ptrs, *ints, *consts))
        bound(x_.data_ptr(), out_.data_ptr(), 0 if wsp is None else wsp.data_ptr(), 77)
        want, got = calls[-2:]
        assert by_address(got) == by_address(want)
        assert got[13][0] == "map" and got[13][1] == x_.data_ptr() and got[18][1] == codes.data_ptr()


@pytest.mark.parametrize("binds", [True, False])
def test_the_tuner_times_a_ws_candidate_as_a_bound_layer_launches_it(binds, monkeypatch):
    """A ws candidate's first launch goes through _run (compiling it), and its timed launches through
    the bound launch where the fast launch binds one: the tuner's x and out, the workspace of the
    stream it is called on (the graph timing captures on its own), stream-K's counters. Where nothing
    binds, every timed launch goes through _run."""
    launched, bound_calls, binds_with = [], [], []
    monkeypatch.setattr(kt, "_run", lambda *a, **k: launched.append(a) or "kernel")
    fake = type("Ws", (), {"bind": staticmethod(lambda *a: binds_with.append(a) or (
        (lambda *c: bound_calls.append(c)) if binds else None))})
    monkeypatch.setattr(kc, "ws_module", lambda: fake)
    streams = iter([11, 22])
    monkeypatch.setattr(kt, "_current_raw_stream", lambda i: next(streams))
    monkeypatch.setattr(kt, "_raw_stream", lambda i: 5)
    monkeypatch.setattr(kt, "_WORKSPACES", {})  # the fake streams' workspaces go with the test
    qw, _, gen = _case(256, 512, 128, torch.bfloat16, False, seed=31)
    x, out = torch.randn(64, 512, generator=gen).to(torch.bfloat16), torch.empty(64, 256, dtype=torch.bfloat16)
    cfg = (64, 128, 128, -8, kc.WS_WARPS, 4)
    cnt = torch.zeros(ws.counter_count(64, 256, (64, 128, 4)), dtype=torch.int32)
    sz = kt.pack_scales_zeros(qw)
    run = kt._ws_candidate(cfg, x, qw, out, cnt, sz)
    assert len(launched) == 1 and launched[0][0] == cfg and launched[0][6] == 5
    (args,) = binds_with
    assert args[0] == "kernel" and args[1] is x and args[4] is out and args[5] == (64, 128, 4) and args[8] == 8
    assert args[10] is cnt and args[9].numel() >= kc.partials_numel(cfg, 64, 256)
    run()
    run()
    if binds:
        assert len(launched) == 1 and [c[3] for c in bound_calls] == [11, 22]
        assert all(c[:2] == (x.data_ptr(), out.data_ptr()) for c in bound_calls)
        assert bound_calls[0][2] == kt._workspace(x.device, 11, 1)[1] != kt._workspace(x.device, 22, 1)[1]
    else:
        assert len(launched) == 3 and not bound_calls


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
def test_gpu_tuner_candidate_under_fast_launch_is_the_launch_bit_for_bit(monkeypatch):
    """What the tuner times of a ws candidate (int4_triton._ws_candidate: the bound launch, with
    FAST_LAUNCH) computes what `launch` does, bit for bit, whole tiles and stream-K, on the current
    stream and on another one (the graph timing's), the input rewritten between calls."""
    monkeypatch.setattr(settings, "FAST_LAUNCH", True)
    qw, _, gen = _case(768, 2048, 128, torch.bfloat16, False, seed=29)
    qw = qw.to("cuda")
    for cfg in ((128, 128, 128, 1, kc.WS_WARPS, 4), (64, 256, 128, -12, kc.WS_WARPS, 3)):
        layer = kt.BoundLinear(qw, None, config=cfg)  # the operand-tiled codes and packed scales
        x = torch.randn(96, 2048, generator=gen).to("cuda", torch.bfloat16)
        out = torch.empty(96, 768, device="cuda", dtype=torch.bfloat16)
        want = torch.empty_like(out)
        cnt = torch.zeros(kc.counter_slots(cfg, 96, 768), device="cuda", dtype=torch.int32)
        run = kt._ws_candidate(cfg, x, layer.weight, out, cnt, layer._sz)
        side = torch.cuda.Stream()
        for step in range(3):
            x.copy_(torch.randn(96, 2048, generator=gen).to("cuda", torch.bfloat16))
            if step == 2:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream().wait_stream(side)
            else:
                run()
            kt.launch(x, layer.weight, want, cfg, counters=cnt, layout="operand-tiled", sz=layer._sz)
            assert torch.equal(out, want), (cfg, step)


def test_two_consumer_partitions_count_a_tile_twice_and_keep_their_own_tuner_key(monkeypatch):
    """CONSUMER_PARTS 2: a stream-K launch's counters are one per (tile, half), wherever the host sizes
    them (counter_slots: the tuner's search and the bound layers' plans), and a launch handed one per
    tile is refused; the tiles whose consumers would hold 128 accumulator floats a thread are left out
    and refused; the tuned table keys it apart (-cp2)."""
    cfg = (128, 128, 128, -132, kc.WS_WARPS, 4)
    assert kc.counter_slots(cfg, 512, 1024) == ws.counter_count(512, 1024, (128, 128, 4)) == 32
    assert kc.counter_slots((128, 128, 64, -132, 8, 3), 512, 1024) == 32  # a Triton tile: one a tile, always
    args = (512, 1024, 4096, 128, torch.bfloat16, "operand-tiled", 1)
    key1 = tn.tuner_key(*args, ws)
    monkeypatch.setattr(settings, "CONSUMER_PARTS", 2)
    assert kc.counter_slots(cfg, 512, 1024) == ws.counter_count(512, 1024, (128, 128, 4)) == 64
    assert kc.counter_slots((128, 128, 64, -132, 8, 3), 512, 1024) == 32
    key2 = tn.tuner_key(*args, ws)
    assert "-cp2" in key2 and key2.replace("-cp2", "") == key1 and "-cp2" not in key1
    assert "-cp2" not in tn.tuner_key(*args, None)  # no ws tiles among the candidates: nothing to tell apart
    assert ws.configs(512, 28672, 8192, 128) == [(128, 128, 4)]  # not (128, 256, 3) nor (256, 128, 3)
    assert ws.configs(64, 28672, 8192, 128) == [(64, 128, 4), (64, 256, 3)]
    assert ws.configs(16, 28672, 8192, 128) == [(16, 128, 8), (16, 256, 6)]
    x = torch.zeros(512, 4096, dtype=torch.bfloat16)
    codes = torch.zeros(1024, 2048, dtype=torch.uint8)
    sz = torch.zeros(1024, 32, dtype=torch.int32)
    out = torch.empty(512, 1024, dtype=torch.bfloat16)
    work = torch.empty(2 * 132 * 128 * 128)
    with pytest.raises(ValueError, match="64 zeroed counters"):
        ws.launch(x, codes, sz, out, (128, 128, 4), 128, programs=132, ws=work,
                  counters=torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="at most 16384 outputs"):
        ws.launch(x, codes, sz, out, (128, 256, 3), 128)


def test_the_two_consumer_variant_sets_consumer_parts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_variants as kv

    v = kv.VARIANTS["operand-tiled-ws-fixup16-loads4-2cons"]
    assert v == {**kv.VARIANTS["operand-tiled-ws-fixup16-loads4"], "CONSUMER_PARTS": 2}
    assert kv.VARIANTS["operand-tiled-ws-fixup16-loads4"]["CONSUMER_PARTS"] == 1


def test_fast_launch_keeps_its_own_tuner_key_and_variants(monkeypatch):
    """FAST_LAUNCH changes what the tuner's eager timings see of a ws candidate (the host's cost), so a
    table tuned with it is keyed apart (-fl); its variants set it and nothing else."""
    args = (512, 1024, 4096, 128, torch.bfloat16, "operand-tiled", 1)
    monkeypatch.setattr(settings, "FAST_LAUNCH", False)
    key = tn.tuner_key(*args, ws)
    monkeypatch.setattr(settings, "FAST_LAUNCH", True)
    assert tn.tuner_key(*args, ws) == key + "-fl" and "-fl" not in tn.tuner_key(*args, None)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_variants as kv

    for base in ("operand-tiled-ws-fixup16-loads4", "operand-tiled-ws-fixup16-loads4-sliced"):
        assert kv.VARIANTS[base + "-fast"] == {**kv.VARIANTS[base], "FAST_LAUNCH": True}
        assert kv.VARIANTS[base]["FAST_LAUNCH"] is False


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_two_consumer_partitions_fence_128_threads_and_keep_the_wgmma_asynchronous(monkeypatch):
    """CONSUMER_PARTS 2: each consumer partition's K loop (one per partition, BLOCK_N / 2 rows) keeps its
    two m64 wgmma a chunk and a wait a chunk leaving three groups in flight, and ptxas serializes nothing
    (no setmaxnreg: one in a worker partition made ptxas serialize its wgmma, C7512). Every barrier in
    either K loop, and the one before each half's stream-K arrival (gl.thread_barrier), is a named barrier
    of 128 threads, a different one per partition: none waits for the other partition's threads."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    monkeypatch.setattr(settings, "CONSUMER_PARTS", 2)
    for cfg, hgmma in (((128, 128, 4), 8), ((16, 256, 6), 16)):
        sass, ptx, _ = sass_counts.compile_ws(cfg)
        assert "no performance warning" in sass_counts._ptxas(ptx) and "USETMAXREG" not in sass, cfg
        ins, labels = [], {}
        for line in sass.splitlines():
            lab = re.match(r"\s*\.L_x_(\d+):", line)
            if lab:
                labels[lab.group(1)] = len(ins)
            elif m := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
                ins.append(m.group(1))
        loops = [ins[labels[m.group(1)]:i + 1] for i, t in enumerate(ins)
                 if (m := re.search(r"BRA.*\.L_x_(\d+)", t)) and labels.get(m.group(1), i + 1) <= i]
        k_loops = [lp for lp in loops if len(lp) < 600 and any(t.startswith("HGMMA") for t in lp)]
        named = set()
        for lp in k_loops:  # the innermost loops with wgmma: the two partitions' K loops
            assert sum(t.startswith("HGMMA") for t in lp) == hgmma, (cfg, lp)
            assert [t for t in lp if t.startswith("WARPGROUP.DEPBAR")] == ["WARPGROUP.DEPBAR.LE gsb0, 0x3"] * 4, cfg
            bars = {t for t in lp if t.startswith("BAR.SYNC")}
            assert bars and all(t.endswith(", 0x80") for t in bars), (cfg, bars)
            named |= bars
        assert len(k_loops) == 2 and len(named) == 2, (cfg, named)  # one barrier id each
        # the barrier before each half's arrival on its stream-K counter: its partition's 128 threads
        lines = ptx.splitlines()
        arrivals = [i for i, ln in enumerate(lines) if "atom.global.gpu.acq_rel.add" in ln]
        fences = [next(ln.split(None, 1)[1] for ln in reversed(lines[:i]) if "bar.sync" in ln or "barrier.sync" in ln)
                  for i in arrivals]
        assert len(fences) == 2 and len(set(fences)) == 2 and all(f.endswith(", 128;") for f in fences), fences
    lines = _sass_lines("128,128,4", "--consumer-parts", "2", "--count", "HGMMA,WARPGROUP.DEPBAR.LE,STS,BAR")
    loop = next(ln for ln in lines if ln.startswith("loop"))
    assert "HGMMA: 8" in loop and "WARPGROUP.DEPBAR.LE: 4" in loop and "STS: 0" in loop, loop
    assert any("ptxas:" in ln and "no performance warning" in ln for ln in lines), lines


@needs_gluon
@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for sm_90 on CPU-only machines")
def test_sass_one_consumer_partition_is_the_kernel_it_was(monkeypatch):
    """CONSUMER_PARTS 1 (the default) compiles the kernel it did before the setting: every offset, counter
    index and argument for the halves is left out, so the SASS is the same to the instruction (what the
    other SASS tests check of it holds for it alone); here the K loop and the barriers of all 256 consumer
    threads it keeps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    monkeypatch.setattr(settings, "CONSUMER_PARTS", 1)
    sass = sass_counts.compile_ws((128, 128, 4))[0]
    loop = sass_counts.main_loop(sass, holding="HGMMA")
    assert len(loop) == 227 and sum(t.startswith("HGMMA") for t in loop) == 8, len(loop)
    assert [t for t in loop if t.startswith("BAR.SYNC")] == ["BAR.SYNC.DEFER_BLOCKING 0x0, 0x100"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not ws.available(), reason="needs an sm_90 GPU and Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,sliced", [(16, False), (0, False), (16, True)])
def test_gpu_ws_two_consumer_partitions_match_float64_and_one_partition(dtype, rows, sliced, monkeypatch):
    """CONSUMER_PARTS 2, every tile configs() then offers, whole and stream-K (runs crossing tiles, and
    each tile's K in two runs, summed per half by its last program or, FIXUP_SLICED, by all of them),
    stream-K parts summed whole (FIXUP_ROWS 0) or 16 rows at a time, M = 16, 64, 128, 512 and a ragged
    one: within 3e-3 of float64, and bit for bit the output of one consumer partition on the same launch
    configuration (the same products, the parts added in the same order), counters left zeroed."""
    monkeypatch.setattr(settings, "FIXUP_ROWS", rows)
    monkeypatch.setattr(settings, "FIXUP_SLICED", sliced)
    for n, k, sym, bias in ((512, 1024, False, True), (768, 2048, True, False)):
        qw, b, gen = _case(n, k, 128, dtype, bias, seed=n + 17, sym=sym)
        qw, b = qw.to("cuda"), None if b is None else b.to("cuda")
        w_kernel = qw.dequantize_stored(dtype).double()
        monkeypatch.setattr(settings, "CONSUMER_PARTS", 2)
        tiles = ws.configs(512, n, k, 128) + ws.configs(64, n, k, 128) + ws.configs(16, n, k, 128)
        assert len(tiles) == 5 and all(bm * bn <= ws.ACC_LIMIT_2P for bm, bn, _ in tiles), tiles
        for bm, bn, st in tiles:
            for sk in (1, -5, -2 * ws.tiles(bm, n, (bm, bn, st))):
                cfg = (bm, bn, 128, sk, kc.WS_WARPS, st)
                bound = {}
                for parts in (1, 2):  # a layer each: its plans' counters are sized under its setting
                    monkeypatch.setattr(settings, "CONSUMER_PARTS", parts)
                    bound[parts] = kt.BoundLinear(qw, b, config=cfg)
                for m in sorted({16, 64, 128, 512, bm + 7}):
                    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
                    ref = x.double() @ w_kernel.T + (0 if b is None else b.double())
                    outs = {}
                    for parts in (1, 2):
                        monkeypatch.setattr(settings, "CONSUMER_PARTS", parts)  # launch reads it per call
                        outs[parts] = bound[parts](x)
                        if sk < 0:
                            plan = bound[parts].plans[m]
                            assert plan.counters.numel() == parts * ws.tiles(m, n, (bm, bn, st))
                            assert not plan.counters.any()
                    assert _rel(outs[2], ref) < 3e-3, (bm, bn, st, sk, m, dtype)
                    assert torch.equal(outs[1], outs[2]), (bm, bn, st, sk, m, dtype)

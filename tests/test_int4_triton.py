"""The Triton INT4 kernel against the reference, on fresh random inputs, output poisoned first.

Without CUDA these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on
small shapes; with CUDA (`-m gpu`) on the real compiler over many shapes in bf16/fp16.
"""

import json
from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from quantbridge.kernels import int4_configs as kc  # noqa: E402
from quantbridge.kernels import int4_layouts as lay  # noqa: E402
from quantbridge.kernels import int4_settings as settings  # noqa: E402
from quantbridge.kernels import int4_triton as kt  # noqa: E402
from quantbridge.kernels import int4_tuner as tn  # noqa: E402
from quantbridge.kernels.int4_codes import neg_magic_zero  # noqa: E402
from quantbridge.plugin.packed import quantize_rtn  # noqa: E402
from quantbridge.plugin.spec import QuantSpec  # noqa: E402


def _case(m, n, k, gs, sym, dtype, device, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if act_order else None
    qw = quantize_rtn(w, QuantSpec(group_size=gs, symmetric=sym), scale_dtype=dtype, perm=perm).to(device)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    ref = x.double() @ qw.dequantize(torch.float64).T
    return x, qw, ref


def _check(x, qw, ref, cfg, tol):
    xp = x.index_select(-1, qw.perm) if qw.perm is not None else x
    out = torch.full((x.shape[0], qw.out_features), float("nan"), device=x.device, dtype=x.dtype)
    k = qw.in_features
    if cfg != kc.DEQUANT_CUBLAS and cfg[0] != 1 and not kc.splits(k, cfg[2], cfg[3]):
        with pytest.raises(ValueError, match="leaves a split empty"):  # refused, never run
            kt.launch(xp.contiguous(), qw, out, cfg)
        return
    kt.launch(xp.contiguous(), qw, out, cfg)
    assert not out.isnan().any(), "unwritten outputs"
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel <= tol, (cfg, rel)


# (M, N, K, group, symmetric, config): every branch of the kernel, with N and K not
# multiples of the tiles, split-K with a ragged last split, and per-channel groups.
INTERPRETER_CASES = [
    (1, 40, 256, 128, False, (16, 16, 128, 1, 4, 3)),   # factored scale/zero, one token
    (1, 33, 512, 32, True, (16, 16, 128, 4, 4, 3)),     # tile spans 4 groups: gathered scales
    (1, 24, 384, 64, False, (16, 16, 256, 2, 4, 3)),    # K=384: last tile half masked
    (3, 50, 384, 32, False, (16, 32, 64, 3, 4, 3)),   # dot path, 6 tiles over 3 splits
    (5, 64, 512, 128, True, (16, 32, 256, 2, 4, 3)),
    (20, 24, 256, -1, False, (32, 16, 64, 1, 4, 3)),  # per-channel
    (70, 20, 128, 64, False, (64, 16, 64, 1, 4, 3)),  # M not a multiple of BLOCK_M, dequantize-then-dot
    (130, 40, 512, 128, False, (128, 32, 64, 4, 8, 3)),  # large-M tile split over K (M=64..256 candidates)
    (40, 36, 256, 128, True, kc.DEQUANT_CUBLAS),       # large-M path: Triton dequantize + matmul
    # CUDA-core GEMV (BLOCK_M = 1): words of 8 codes, one group per tile
    (1, 40, 256, 128, False, (1, 32, 128, 1, 4, 3)),
    (2, 33, 512, 64, True, (1, 32, 64, 4, 4, 3)),     # two rows, N ragged, split-K
    (1, 24, 384, -1, False, (1, 16, 128, 2, 4, 3)),   # per-channel, 3 tiles over 2 splits
    (1, 50, 320, 64, False, (1, 64, 64, 3, 4, 3)),  # 5 tiles over 3 splits, ragged last split
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("m,n,k,gs,sym,cfg", INTERPRETER_CASES)
def test_interpreter_matches_reference(m, n, k, gs, sym, cfg):
    x, qw, ref = _case(m, n, k, gs, sym, torch.float32, "cpu", seed=m * 31 + n)
    _check(x, qw, ref, cfg, 1e-5)  # fp32 in the interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("gs", [32, 128, -1])
def test_interpreter_dequantize_is_exact(gs):
    _, qw, _ = _case(1, 40, 512, gs, False, torch.float32, "cpu", seed=gs + 2)
    assert torch.equal(kt.dequantize(qw, torch.float32), qw.dequantize_stored(torch.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_never_reads_scales_past_k():
    # K=320 is 2.5 tiles of 128 in 2 splits of 2 tiles: the second split's second tile lies wholly
    # past K (a split with no tile at all is refused: test_split_k_never_leaves_a_split_empty).
    # Memory after the scales is NaN, so any read past the last group shows up in the output.
    x, qw, ref = _case(3, 50, 320, 64, False, torch.float32, "cpu", seed=11)
    buf = torch.full((qw.scales.numel() + 64,), float("nan"))
    buf[: qw.scales.numel()] = qw.scales.flatten()
    qw.scales = buf[: qw.scales.numel()].view_as(qw.scales)
    _check(x, qw, ref, (16, 32, 128, 2, 4, 3), 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_act_order_through_public_entry():
    x, qw, ref = _case(4, 32, 256, 64, False, torch.float32, "cpu", act_order=True, seed=5)
    out = kt.int4_linear(x, qw)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def _with_offsets(qw, dtype, seed):
    """The same codes and scales with a random float offset per group (w = q * s + m, GGUF's form)."""
    from quantbridge.plugin.packed import Int4Weight

    gen = torch.Generator().manual_seed(seed)
    m = (torch.randn(qw.scales.shape, generator=gen) * qw.scales.float().abs().mean().cpu() * 8).to(dtype)
    return Int4Weight(qw.qweight, qw.scales, torch.zeros_like(qw.zeros), qw.group_size, qw.perm,
                      offsets=m.to(qw.qweight.device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("m,n,k,gs,sym,cfg", INTERPRETER_CASES)
@pytest.mark.parametrize("off_dtype", [torch.float32, torch.float16])
def test_interpreter_float_offsets_match_reference(m, n, k, gs, sym, cfg, off_dtype):
    # Every kernel path with w = q * s + m (Q4_1 keeps m in fp16, Q4_K in fp32).
    x, qw, _ = _case(m, n, k, gs, sym, torch.float32, "cpu", seed=m * 17 + n)
    qw = _with_offsets(qw, off_dtype, seed=n)
    ref = x.double() @ qw.dequantize(torch.float64).T
    _check(x, qw, ref, cfg, 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(16, 16, 128, 2, 4, 3), (32, 16, 64, 1, 4, 3), (16, 16, 256, 2, 4, 3), (1, 32, 128, 2, 4, 3)])
@pytest.mark.parametrize("offsets", [False, True])
def test_interpreter_fp16_codes_by_bit_trick(cfg, offsets):
    # fp16 activations take the 1024 + q path of _as_float (the interpreter has no bf16);
    # the bound is fp16's rounding of the output (2^-11) with room for the sum's.
    x, qw, _ = _case(3, 40, 512, 128, False, torch.float16, "cpu", seed=len(cfg) + offsets)
    if offsets:
        qw = _with_offsets(qw, torch.float16, seed=3)
    ref = x.double() @ qw.dequantize(torch.float64).T
    _check(x, qw, ref, cfg, 1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("gs", [32, 128])
def test_interpreter_dequantize_offsets_is_exact(gs):
    _, qw, _ = _case(1, 40, 512, gs, False, torch.float32, "cpu", seed=gs + 9)
    qw = _with_offsets(qw, torch.float16, seed=gs)
    assert torch.equal(kt.dequantize(qw, torch.float32), qw.dequantize_stored(torch.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("m,n,k,gs,sym,cfg", INTERPRETER_CASES[::2])
@pytest.mark.parametrize("mode", ["i2f", "magic", "inplace", "prefetch", "async", "xprep"])
@pytest.mark.parametrize("offsets", [False, True])
def test_interpreter_other_code_modes_match(m, n, k, gs, sym, cfg, mode, offsets, monkeypatch):
    # The modes kept for A/B timing beside the default (benchmarks/kernel_variants.py).
    monkeypatch.setattr(settings, "CODE_MODE", mode)
    x, qw, _ = _case(m, n, k, gs, sym, torch.float32, "cpu", seed=m * 7 + n)
    if offsets:
        qw = _with_offsets(qw, torch.float32, seed=m)
    ref = x.double() @ qw.dequantize(torch.float64).T
    _check(x, qw, ref, cfg, 1e-5)


def test_configs_are_valid_for_shapes():
    for m in (1, 2, 16, 64, 128, 4096):
        cfgs = kc.candidate_configs(kc.m_bucket(m), 4096, 4096, 128)
        assert cfgs and all(c == kc.DEQUANT_CUBLAS or (c[2] % 2 == 0 and c[3] >= 1) for c in cfgs)
        # GEMV tiles only for the smallest M, each inside one group
        assert all(c[0] != 1 or (m <= 2 and 128 % c[2] == 0) for c in cfgs)
    assert kc.m_bucket(1) == 1 and kc.m_bucket(3) == 4 and kc.m_bucket(5000) == 4096


# One configuration per kernel path, so the GPU tests compile a handful of kernels
# instead of tuning every shape (the tuner itself is tested once below).
GPU_CONFIGS = [(1, 64, 32, 4, 4, 3), (16, 64, 256, 4, 4, 3), (16, 64, 128, 4, 4, 3), (32, 64, 64, 2, 4, 3), (128, 128, 64, 1, 8, 3),
               (128, 128, 64, 2, 8, 3), kc.DEQUANT_CUBLAS]
GPU_SHAPES = [(1, 4096, 4096), (3, 1000, 1152), (16, 264, 640), (33, 4096, 1024), (600, 1000, 1152)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gs,sym", [(32, False), (64, True), (128, False), (-1, True)])
def test_gpu_kernel_matches_reference(dtype, gs, sym):
    for i, (m, n, k) in enumerate(GPU_SHAPES):
        if gs > 0 and k % gs:
            continue
        x, qw, ref = _case(m, n, k, gs, sym, dtype, "cuda", seed=i)
        for cfg in GPU_CONFIGS:
            _check(x, qw, ref, cfg, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("off_dtype", [torch.float32, torch.float16])
def test_gpu_float_offsets_match_reference(dtype, off_dtype):
    from quantbridge.plugin.kernel import get_kernel

    for i, (m, n, k) in enumerate(GPU_SHAPES[:4]):
        x, qw, _ = _case(m, n, k, 64, False, dtype, "cuda", seed=40 + i)
        qw = _with_offsets(qw, off_dtype, seed=i)
        ref = x.double() @ qw.dequantize(torch.float64).T
        for cfg in GPU_CONFIGS:
            _check(x, qw, ref, cfg, 1e-2)
        layer = get_kernel("triton").build(qw, None)  # the bound launch path, as gguf weights take it on CUDA
        assert layer.kernel == "quantbridge.triton"
        for cfg in GPU_CONFIGS[:-1]:
            if cfg[0] != 1 and not kc.splits(k, cfg[2], cfg[3]):
                continue  # refused (an empty split over whole K-tiles): _check above asserts it
            layer._bound.config, layer._bound.plans = cfg, {}
            rel = ((layer(x).double() - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, (cfg, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["i2f", "magic", "inplace", "prefetch", "async", "xprep"])
def test_gpu_other_code_modes_match(dtype, mode, monkeypatch):
    monkeypatch.setattr(settings, "CODE_MODE", mode)  # the modes benchmarks/kernel_variants.py times
    x, qw, ref = _case(3, 1000, 1152, 128, False, dtype, "cuda", seed=5)
    for cfg in GPU_CONFIGS:
        _check(x, qw, ref, cfg, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,configs", [
    ("xprep", [(1, 64, 128, 1, 4, 3), (1, 64, 128, 4, 4, 3)]),
    ("tiled", [(1, 64, 128, 4, 4, 3), (16, 128, 128, 2, 4, 3), (64, 128, 64, 1, 4, 3), (128, 128, 64, 2, 8, 3)]),
    ("operand", [(16, 64, 128, 4, 4, 3), (16, 128, 64, 1, 4, 3), (64, 128, 64, 2, 4, 3), (128, 128, 64, 1, 8, 3),
                 (256, 128, 64, 1, 8, 3), (128, 128, 64, -64, 4, 4), (64, 128, 128, -48, 4, 3)]),
    ("operand-tiled", [(1, 64, 128, 4, 4, 3), (16, 64, 128, 4, 4, 3), (16, 128, 64, 1, 4, 3), (64, 128, 128, 1, 4, 3),
                       (128, 128, 64, 1, 4, 4), (256, 128, 64, 1, 8, 3), kc.DEQUANT_CUBLAS])])
def test_gpu_bound_layer_modes_eager_and_in_a_graph(mode, configs, monkeypatch):
    """"xprep" runs two launches per call (activations prepared, then the GEMV); "tiled" reads a
    tile-major copy of the codes; "operand" its operand layout, scales applied in bf16;
    "operand-tiled" that layout stored tile-major (OPERAND_TILED), through the GEMV, the tiles and
    dequantize + cuBLAS; negative split-K: stream-K over that many programs. A bound layer gives
    the reference product on its first call, on later calls and replayed in a CUDA graph. bf16
    outputs: 1e-2 covers their rounding and, for the operand layouts, the weight's."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand" if mode == "operand-tiled" else mode)
    monkeypatch.setattr(settings, "OPERAND_TILED", mode == "operand-tiled")
    for i, cfg in enumerate(configs):
        m = 2 if cfg[0] <= 1 else cfg[0] - 3
        x, qw, ref = _case(m, 1024, 1024, 128, False, torch.bfloat16, "cuda", seed=70 + i)
        layer = kt.BoundLinear(qw, config=cfg)
        assert layer.layout == {"tiled": "tiled", "operand": "operand", "operand-tiled": "operand-tiled"}.get(
            mode, "canonical")
        for _ in range(2):
            rel = ((layer(x).double() - ref).norm() / ref.norm()).item()
            assert rel <= 1e-2, (cfg, rel)
        static = x.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = layer(static)
        static.copy_(torch.randn_like(static))  # a new input through the captured launches
        g.replay()
        want = static.double() @ qw.dequantize(torch.float64).to(static.device).T
        rel = ((y.double() - want).norm() / want.norm()).item()
        assert rel <= 1e-2, (cfg, rel)


@pytest.mark.gpu
def test_gpu_tuner_picks_a_correct_config_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(tmp_path))
    tuner = tn.Tuner(kt.candidate_run)
    # K/g = 32: the specialization benchmarks/precompile_triton.py compiles, so the search hits its cache
    x, qw, ref = _case(16, 2048, 4096, 128, False, torch.bfloat16, "cuda", seed=3)
    cfg = tuner.config(x, qw)
    _check(x, qw, ref, cfg, 1e-2)
    cached = list(tmp_path.glob("triton-int4-*.json"))
    assert len(cached) == 1 and "m16-n2048-k4096-g128-bfloat16" in cached[0].read_text()
    again = tn.Tuner(kt.candidate_run)
    again._search = None  # a second tuner must read the file, not search again
    assert again.config(x, qw) == cfg


@pytest.mark.gpu
@pytest.mark.parametrize("timing", ["read", "graph"])
def test_gpu_tuner_timed_as_the_bench_picks_a_correct_config_under_its_own_key(timing, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(settings, "TUNE_TIMING", timing)
    tuner = tn.Tuner(kt.candidate_run)
    x, qw, ref = _case(16, 2048, 4096, 128, False, torch.bfloat16, "cuda", seed=5)
    cfg = tuner.config(x, qw)
    _check(x, qw, ref, cfg, 1e-2)
    assert cfg in kc.candidate_configs(16, 2048, 4096, 128)
    keys = json.loads(next(tmp_path.glob("triton-int4-*.json")).read_text())
    assert [key for key in keys if key.startswith("m16-n2048-k4096-g128-bfloat16")] == \
        [tn.tuner_key(16, 2048, 4096, 128, torch.bfloat16, "canonical", 0)]
    assert next(iter(keys)).endswith({"read": "-frd", "graph": "-tgr"}[timing])


@pytest.mark.gpu
def test_gpu_act_order_and_bias_via_native_backend():
    from quantbridge.plugin.backend import get

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 300, bias=True).cuda().to(torch.bfloat16)
    q = get("native").quantize(lin, QuantSpec(group_size=128))
    assert q.kernel == "quantbridge.triton"
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize().double().T + lin.bias.double()
    assert ((q(x).double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_gpu_cached_launches_match_reference():
    """After the first call, launches skip Triton's binder: shapes that share a configuration
    but not a specialization (M = 1 vs 3, aligned vs offset pointers) must still be right."""
    cfg = (16, 64, 128, 3, 4, 3)  # split-K 3 over K = 9 whole tiles: no split empty (kc.splits)
    cases = [_case(m, 1000, 1152, 128, False, torch.bfloat16, "cuda", seed=10 + m) for m in (1, 3, 16, 1, 3)]
    for _ in range(3):  # every case runs through the cached launcher at least twice
        for x, qw, ref in cases:
            _check(x, qw, ref, cfg, 1e-2)
    x, qw, ref = cases[1]
    big = torch.randn(x.shape[0], x.shape[1] + 3, device="cuda", dtype=x.dtype)
    big[:, 3:] = x  # an activation view 6 bytes past an aligned address, row stride K + 3
    for _ in range(2):
        out = torch.full((x.shape[0], qw.out_features), float("nan"), device="cuda", dtype=x.dtype)
        kt.launch(big[:, 3:], qw, out, cfg)
        assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2
    assert len(kt._MATMUL.cache) >= 3


# --- BoundLinear: the per-layer, per-M cached launch behind NativeLinear.forward ---------

def _bound_case(n, k, gs, dtype, device, act_order, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    perm = torch.randperm(k, generator=gen) if act_order else None
    qw = quantize_rtn(w, QuantSpec(group_size=gs), scale_dtype=dtype, perm=perm).to(device)
    b = (torch.randn(n, generator=gen) * 0.5).to(device, dtype) if bias else None
    return qw, b


def _ref(x, qw, b):
    ref = x.double() @ qw.dequantize(torch.float64).T
    return ref if b is None else ref + b.double()


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# A split-K GEMV, a split-K tensor-core tile with gathered scales, and a one-split tile.
BOUND_CONFIGS = [(1, 16, 64, 3, 4, 3), (16, 16, 128, 2, 4, 3), (16, 32, 64, 1, 4, 3)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", BOUND_CONFIGS)
@pytest.mark.parametrize("act_order,bias", [(False, False), (True, True)])
def test_interpreter_bound_matches_uncached_across_m(cfg, act_order, bias):
    qw, b = _bound_case(40, 384, 64, torch.float32, "cpu", act_order, bias, seed=len(cfg) + 7 * act_order)
    bound = kt.BoundLinear(qw, b, config=cfg)
    gen = torch.Generator().manual_seed(1)
    for step, m in enumerate((1, 3, 1, 5, 3)):  # M changes between calls and comes back
        x = torch.randn(m, 384, generator=gen)
        if step == 3:
            x = torch.randn(384, m, generator=gen).T  # non-contiguous activations
        out = bound(x)
        ref = _ref(x, qw, b)
        assert out.shape == (m, 40) and _rel(out, ref) < 1e-5, (m, _rel(out, ref))
        uncached = kt.int4_linear(x, qw, b, config=cfg)
        assert _rel(out, uncached.double()) < 1e-6
    assert sorted(bound.plans) == [1, 3, 5]
    for plan in bound.plans.values():  # every split-K launch leaves its tile counters at zero
        assert plan.counters is None or not plan.counters.any()
    x3 = torch.randn(2, 3, 384, generator=gen)  # [batch, seq, K] as a transformer calls it
    out3 = bound(x3)
    assert out3.shape == (2, 3, 40)
    assert _rel(out3.reshape(6, 40), _ref(x3.reshape(6, 384), qw, b)) < 1e-5
    empty = bound(torch.randn(0, 384))
    assert empty.shape == (0, 40)


def test_tiled_layout_round_trips_bit_exact():
    gen = torch.Generator().manual_seed(11)
    qweight = torch.randint(0, 256, (192, 512), generator=gen, dtype=torch.uint8)  # N=192, K=1024
    tiled = lay.to_tiled(qweight)
    assert tiled.shape == qweight.shape and tiled.dtype == torch.uint8
    assert not torch.equal(tiled, qweight) and torch.equal(lay.from_tiled(tiled), qweight)
    # tile (1, 2): rows 64..127, words 32..47, stored whole at the third tile of the second tile row
    words, flat = qweight.view(torch.int32), tiled.view(torch.int32).reshape(-1)
    per_row = 1024 // 8 // 16
    start = (1 * per_row + 2) * 64 * 16
    assert torch.equal(flat[start:start + 64 * 16].reshape(64, 16), words[64:128, 32:48])
    with pytest.raises(ValueError, match="whole 64x128 tiles"):
        lay.to_tiled(qweight[:100])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(1, 64, 128, 3, 4, 3), (1, 32, 64, 2, 4, 3), (16, 64, 128, 2, 4, 3),
                                 (64, 64, 64, 1, 4, 3), (128, 64, 64, 2, 8, 3)])
def test_interpreter_tiled_bound_layer_matches_reference(cfg, monkeypatch):
    """"tiled": a bound layer reads its tile-major copy through every kernel path (GEMV, word tiles,
    byte tiles), with N a whole number of tiles but not of BLOCK_N, and split-K."""
    monkeypatch.setattr(settings, "CODE_MODE", "tiled")
    qw, b = _bound_case(192, 512, 128, torch.float32, "cpu", False, True, seed=cfg[1] + cfg[0])
    bound = kt.BoundLinear(qw, b, config=cfg)
    assert bound.layout == "tiled" and not torch.equal(bound.weight.qweight, qw.qweight)
    gen = torch.Generator().manual_seed(3)
    for m in ((1, 2) if cfg[0] == 1 else (cfg[0] - 3,)):  # a ragged last M tile
        x = torch.randn(m, 512, generator=gen)
        assert _rel(bound(x), _ref(x, qw, b)) < 1e-5, m
    ragged, _ = _bound_case(40, 384, 64, torch.float32, "cpu", False, False, seed=5)
    assert kt.BoundLinear(ragged, config=cfg).layout == "canonical"  # not whole tiles


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_bound_rejects_what_the_kernel_cannot_run():
    qw, _ = _bound_case(24, 128, 64, torch.float32, "cpu", False, False, seed=2)
    bound = kt.BoundLinear(qw, config=(1, 16, 64, 1, 4, 3))
    with pytest.raises(TypeError, match="scales are"):
        bound(torch.randn(2, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="features"):
        bound(torch.randn(2, 256))
    # an activation 4 bytes past an aligned address is copied, not read misaligned
    buf = torch.randn(2 * 128 + 1)
    x = buf[1:].view(2, 128)
    assert _rel(bound(x), _ref(x, qw, None)) < 1e-5


def test_native_linear_moves_and_rebinds():
    from quantbridge.plugin.backend import get

    lin = torch.nn.Linear(128, 24)
    q = get("native").quantize(lin, QuantSpec(group_size=64))
    assert q._bound is None  # CPU: the reference kernel
    q = q.to(torch.float32)
    assert q._retired == []  # a no-op move keeps the bound launch (graphs captured with it stay valid)
    x = torch.randn(3, 128)
    ref = x.double() @ q.dequantize().double().T + lin.bias.double()
    assert _rel(q(x), ref) < 1e-5
    q = q.to(torch.float64)  # the buffers really change: bind again, keep the old launch alive
    assert len(q._retired) == 1 and q.kernel == "reference-torch"


@pytest.mark.gpu
def test_gpu_graph_survives_a_no_op_move_and_cpu_round_trip_gets_the_triton_kernel(fixed_tuner):
    from quantbridge.plugin.backend import get

    torch.manual_seed(11)
    lin = torch.nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    q = get("native").quantize(lin, QuantSpec())
    static = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    q(static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = q(static)
    q.to("cuda")  # no-op: the graph's counters and workspace must stay alive
    torch.empty(64 << 20, device="cuda").normal_()  # reuse freed memory, if any was freed
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    static.copy_(x)
    g.replay()
    ref = x.double() @ q.dequantize().to("cuda").double().T + lin.bias.double()
    assert _rel(out, ref) < 1e-2
    assert q.cpu().cuda().kernel == "quantbridge.triton"


@pytest.fixture
def fixed_tuner(monkeypatch):
    """Tuning compiles every candidate; these tests take one split-K config per path instead."""
    def config(x2, w, *_, **__):  # whatever else the layer hands the tuner (laid codes, layout, packed scales)
        m, k = x2.shape
        if m <= 2:
            return (1, 64, 128, 4, 4, 3)
        if m <= 16:  # the most splits (4 or fewer) that leave none empty
            return (16, 64, 128, next(sk for sk in (4, 3, 2, 1) if kc.splits(k, 128, sk)), 4, 3)
        return (32, 64, 64, 2, 4, 3) if m < 128 else kc.DEQUANT_CUBLAS
    monkeypatch.setattr(kt.TUNER, "config", config)


def _native(n, k, dtype, act_order, bias, seed, gs=128):
    from quantbridge.plugin.kernel import get_kernel

    qw, b = _bound_case(n, k, gs, dtype, "cuda", act_order, bias, seed)
    layer = get_kernel("triton").build(qw, b)
    assert layer.kernel == "quantbridge.triton" and layer._bound is not None
    return layer, qw, b


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_native_linear_load_state_dict_refreshes_packed_scales(dtype):
    """A state dict loaded into a bound layer (same buffers, new values) reaches the GEMV and the
    tiles alike: the packed scales the tiles read are re-derived in place."""
    layer, qw, b = _native(1024, 2048, dtype, False, True, seed=41)
    donor, qd, bd = _native(1024, 2048, dtype, False, True, seed=42)
    xs = [torch.randn(m, 2048, device="cuda", dtype=dtype) for m in (1, 48)]
    for x in xs:
        assert _rel(layer(x), _ref(x, qw, b)) < 1e-2
    layer.load_state_dict(donor.state_dict())
    for x in xs:
        assert _rel(layer(x), _ref(x, qd, bd)) < 1e-2, x.shape[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_order,bias", [(False, False), (True, True)])
def test_gpu_native_linear_bound_path(dtype, act_order, bias, fixed_tuner):
    """NativeLinear's cached launch over a sequence of M, through the compiled launcher,
    against the float64 reference and the uncached path; fixed split-K configs, fresh inputs."""
    layer, qw, b = _native(1000, 1152, dtype, act_order, bias, seed=21)
    gen = torch.Generator().manual_seed(4)
    for step, m in enumerate((1, 16, 3, 1, 16, 40, 3, 1)):
        x = torch.randn(m, 1152, generator=gen).cuda().to(dtype)
        if step == 4:
            x = torch.randn(1152, m, generator=gen).cuda().to(dtype).T  # non-contiguous
        if step == 5:
            x = x.reshape(2, 20, 1152)  # [batch, seq, K]
        out = layer(x)
        ref = _ref(x.reshape(-1, 1152), qw, b)
        assert _rel(out.reshape(-1, 1000), ref) < 1e-2, (m, _rel(out, ref))
        assert _rel(out.reshape(-1, 1000), kt.int4_linear(x, qw, b).reshape(-1, 1000).double()) < 1e-2
    plans = layer._bound.plans
    assert set(plans) == {1, 3, 16, 40}
    assert all(p.raw is not None for p in plans.values() if p.cfg != kc.DEQUANT_CUBLAS)
    torch.cuda.synchronize()
    assert all(p.counters is None or not p.counters.any() for p in plans.values())


@pytest.mark.gpu
def test_gpu_bound_split_k_configs_and_misaligned_input():
    """Every split-K shape of the fused reduction (GEMV and tensor-core tiles), forced."""
    for cfg in [(1, 64, 128, 8, 4, 3), (1, 128, 64, 16, 8, 4), (16, 64, 128, 4, 4, 3), (16, 128, 64, 8, 8, 4)]:
        qw, b = _bound_case(4096, 4096, 128, torch.bfloat16, "cuda", False, True, seed=cfg[1] + cfg[3])
        bound = kt.BoundLinear(qw, b, config=cfg)
        for m in (1, 5, 16, 1):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            assert _rel(bound(x), _ref(x, qw, b)) < 1e-2, (cfg, m)
        big = torch.randn(3, 4096 + 3, device="cuda", dtype=torch.bfloat16)
        x = big[:, 3:]  # 6 bytes past an aligned address, row stride K + 3
        assert _rel(bound(x), _ref(x, qw, b)) < 1e-2


def _capture(fn, static_x):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            static_out = fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    return g, static_out


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [True, False])
def test_gpu_cuda_graph_replay_with_new_inputs(warm, fixed_tuner):
    """Two layers (split-K and not) captured in one graph, replayed with new inputs: the float64
    answer each time. warm=False captures an M first seen inside the capture (its plan stays
    the graph's), then runs that M eagerly too."""
    up, qu, bu = _native(4096, 1024, torch.bfloat16, False, True, seed=31)
    down, qd, bd = _native(1024, 4096, torch.bfloat16, True, False, seed=32)
    m = 4 if warm else 2
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    step = lambda t: down(up(t))  # noqa: E731
    torch.cuda.synchronize()
    if warm:
        step(x)
    else:  # tune and compile for this M outside the capture (tuning times kernels), through twins
        from quantbridge.plugin.kernel import get_kernel

        triton = get_kernel("triton")
        triton.build(qd, None)(triton.build(qu, bu)(torch.randn_like(x)))
    g, out = _capture(step, x)
    if not warm:
        assert up._bound._captured and m not in up._bound.plans
    for _ in range(3):
        x.copy_(torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        h = (x.double() @ qu.dequantize(torch.float64).T + bu.double()).to(torch.bfloat16)
        ref = h.double() @ qd.dequantize(torch.float64).T
        assert _rel(out, ref) < 2e-2
    fresh = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    eager = step(fresh)
    h = (fresh.double() @ qu.dequantize(torch.float64).T + bu.double()).to(torch.bfloat16)
    assert _rel(eager, h.double() @ qd.dequantize(torch.float64).T) < 2e-2


def test_operand_layout_round_trips_bit_exact():
    gen = torch.Generator().manual_seed(12)
    qweight = torch.randint(0, 256, (24, 96), generator=gen, dtype=torch.uint8)  # N=24, K=192
    laid = lay.to_operand(qweight)
    assert laid.shape == qweight.shape and laid.dtype == torch.uint8
    assert not torch.equal(laid, qweight) and torch.equal(lay.from_operand(laid), qweight)
    # word 1 of a chunk holds, in nibble 4c + 2b + a, the chunk's column 16a + 8b + 2 + c
    codes = torch.stack((qweight & 0xF, qweight >> 4), -1).reshape(24, 192)
    word = int(laid.view(torch.int32)[5, 4 + 1]) & 0xFFFFFFFF  # row 5, second chunk, word 1
    for j in range(8):
        c, b, a = j // 4, (j // 2) % 2, j % 2
        assert (word >> (4 * j)) & 0xF == codes[5, 32 + 16 * a + 8 * b + 2 + c]
    with pytest.raises(ValueError, match="32-column chunks"):
        lay.to_operand(qweight[:, :40])
    assert lay.operand_fits(4096, 128) and not lay.operand_fits(4096, 32) and not lay.operand_fits(4112, 128)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(1, 64, 128, 3, 4, 3), (1, 32, 64, 1, 4, 3), (16, 64, 128, 3, 4, 3),
                                 (16, 32, 64, 1, 4, 3), (64, 64, 64, 2, 4, 3), (128, 64, 64, 1, 8, 3),
                                 (256, 32, 64, 1, 8, 3)])
@pytest.mark.parametrize("sym,offsets", [(False, False), (True, False), (False, True)])
def test_interpreter_operand_bound_layer_matches_reference(cfg, sym, offsets, monkeypatch):
    """"operand": a bound layer reads its operand-layout copy through the GEMV and the tensor-core
    tiles (scales applied before the dot), for every M tile (N not a multiple of BLOCK_N, a ragged
    last M tile, split-K with a ragged split), zero-points and symmetric codes. Float offsets
    (GGUF's q * s + m) keep the canonical layout: m rounded to bf16 before the sum would lose the
    weights where q * s is close to -m."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    qw, b = _bound_case(72, 640, 128, torch.float32, "cpu", False, True, seed=cfg[0] + cfg[1] + sym)
    if sym or offsets:
        x0, qw, _ = _case(1, 72, 640, 128, sym, torch.float32, "cpu", seed=cfg[1] + 2 * sym)
    if offsets:
        qw = _with_offsets(qw, torch.float32, seed=cfg[0])
    bound = kt.BoundLinear(qw, b, config=cfg)
    if offsets:
        assert bound.layout == "canonical" and bound.weight.qweight is qw.qweight
    else:
        assert bound.layout == "operand" and torch.equal(bound.weight.qweight, lay.to_operand(qw.qweight))
    gen = torch.Generator().manual_seed(cfg[0])
    for m in ((1, 2) if cfg[0] == 1 else (1, cfg[0] - 3)):
        x = torch.randn(m, 640, generator=gen)
        assert _rel(bound(x), _ref(x, qw, b)) < 1e-5, m
    # groups of 32 do not hold a 64-column tile, and a fixed tile over two groups cannot read the
    # layout: such layers keep the canonical one (and run as in any other mode)
    small, _ = _bound_case(40, 384, 32, torch.float32, "cpu", False, False, seed=5)
    assert kt.BoundLinear(small, config=(16, 32, 32, 1, 4, 3)).layout == "canonical"
    wide = kt.BoundLinear(qw, b, config=(16, 16, 256, 2, 4, 3))
    x = torch.randn(5, 640, generator=gen)
    assert wide.layout == "canonical" and _rel(wide(x), _ref(x, qw, b)) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_operand_codes_are_the_one_copy_dequantize_cublas_reads(monkeypatch):
    """The operand layout is a bound layer's only copy of the codes: dequantize + cuBLAS reads it as
    codes, each value stored at the column it holds, act-order permutation included; canonical()
    gives the codes back bit-exactly."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    qw, b = _bound_case(72, 640, 128, torch.float32, "cpu", True, True, seed=11)
    bound = kt.BoundLinear(qw, b, config=kc.DEQUANT_CUBLAS)
    assert bound.layout == "operand" and bound._dq_w is bound.weight
    assert torch.equal(bound.canonical().qweight, qw.qweight)
    assert torch.equal(kt.dequantize(bound.weight, torch.float32, "operand"), kt.dequantize(qw, torch.float32))
    gen = torch.Generator().manual_seed(12)
    for m in (1, 5):
        x = torch.randn(m, 640, generator=gen)
        assert _rel(bound(x), _ref(x, qw, b)) < 1e-5, m
    # the layout handed in as stored (NativeLinear's one copy) is used as is
    laid = replace(qw, qweight=lay.to_operand(qw.qweight))
    given = kt.BoundLinear(laid, b, config=(16, 64, 128, 1, 4, 3), layout="operand")
    assert given.weight.qweight is laid.qweight
    x = torch.randn(7, 640, generator=gen)
    assert _rel(given(x), _ref(x, qw, b)) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("programs", [1, 7, 40, 90])
@pytest.mark.parametrize("k", [640, 600])
def test_interpreter_stream_k_matches_reference(programs, k):
    """Stream-K (SPLIT_K = -programs): 9 output tiles x 10 K-tiles cut into equal runs, so tiles are
    whole in one run (1 program), shared by two (7) or by up to five (40), or one step per program
    (90); a ragged K (600, one group per row) masks the last K-tile. Every output written once,
    against float64; the tile counters are left zeroed, so a second launch with them gives the
    same bits."""
    m, n = 37, 72
    x, qw, ref = _case(m, n, k, 64 if k % 64 == 0 else -1, False, torch.float32, "cpu", seed=programs + k)
    cfg = (16, 32, 64, -programs, 4, 3)
    counters = torch.zeros(kc.counter_slots(cfg, m, n), dtype=torch.int32)
    outs = []
    for _ in range(2):
        out = torch.full((m, n), float("nan"))
        kt.launch(x, qw, out, cfg, counters=counters)
        assert not out.isnan().any(), "unwritten outputs"
        assert _rel(out, ref) < 1e-5
        assert not counters.any()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="at least as many"):
        kt.launch(x, qw, torch.empty(m, n), (16, 32, 64, -91, 4, 3))  # 90 steps: a program would get none
    assert kc.partials_numel(cfg, m, n) == 2 * programs * 16 * 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("m", [1, 3])
def test_interpreter_stream_k_partials_only_for_rows_of_x(m):
    """A stream-K run's fp32 partial holds the rows of x that exist: at M=1 on a 16-row tile the rest
    of its workspace slot is never written (NaN left in it stays NaN) nor summed into the output."""
    n, k, programs = 72, 640, 7
    x, qw, ref = _case(m, n, k, 64, False, torch.float32, "cpu", seed=70 + m)
    cfg = (16, 32, 64, -programs, 4, 3)
    numel = kc.partials_numel(cfg, m, n)
    ws = kt._workspace(torch.device("cpu"), 0, numel)[2]
    ws.fill_(float("nan"))
    out = torch.full((m, n), float("nan"))
    kt.launch(x, qw, out, cfg, counters=torch.zeros(kc.counter_slots(cfg, m, n), dtype=torch.int32))
    assert _rel(out, ref) < 1e-5
    slots = ws[:numel].view(2 * programs, 16, 32)
    assert slots[:, m:].isnan().all()  # rows past M: never written
    assert not slots[:, :m].isnan().all()  # the runs that share a tile wrote theirs


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("tiled", [False, True])
def test_interpreter_stream_k_operand_tiles_with_packed_scales(tiled, monkeypatch):
    """Stream-K through a bound operand layer's tiles (W x^T, packed scales, bias), codes row-major
    or tile-major (OPERAND_TILED), runs crossing tiles, against float64 through the same dequantized
    weight (fp16 activations)."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    monkeypatch.setattr(settings, "OPERAND_TILED", tiled)
    qw, b = _bound_case(192, 768, 128, torch.float16, "cpu", True, True, seed=61)
    gen = torch.Generator().manual_seed(62)
    for cfg in ((64, 64, 64, -5, 4, 3), (16, 128, 128, -4, 4, 3)):
        bound = kt.BoundLinear(qw, b, config=cfg)
        assert bound.layout == ("operand-tiled" if tiled else "operand") and bound._sz is not None
        # M=1 too: the tuner offers stream-K tiles beside the GEMV
        for m in ((1,) if cfg[0] == 16 else ()) + (cfg[0] - 3, 2 * cfg[0] + 1):
            x = torch.randn(m, 768, generator=gen).to(torch.float16)
            assert _rel(bound(x), _ref(x, qw, b)) < 3e-3, (cfg, m)
            assert bound.plans[m].ws_numel == 2 * -cfg[3] * cfg[0] * cfg[1]


def test_stream_k_candidates_only_where_asked_and_where_they_fit(monkeypatch):
    """The tuner tries stream-K (STREAM_K) on operand tiles: at M >= 64 with one and two programs per
    SM of the device, at M <= 16 with one to three, and never where a program would get no step."""
    monkeypatch.setattr(kc, "_sm_count", lambda: 132)
    monkeypatch.setattr(settings, "STREAM_K", False)
    assert not any(c[3] < 0 for c in kc.candidate_configs(128, 28672, 8192, 128, "operand"))
    monkeypatch.setattr(settings, "STREAM_K", True)
    got = [c for c in kc.candidate_configs(128, 28672, 8192, 128, "operand") if c[3] < 0]
    assert got == [(128, 128, 64, -132, 4, 4), (128, 128, 64, -264, 4, 4), (128, 256, 64, -132, 8, 3)]
    assert not any(c[3] < 0 and c[1] == 256 for c in kc.candidate_configs(64, 28672, 8192, 128, "operand"))
    assert [c for c in kc.candidate_configs(64, 28672, 8192, 128, "operand") if c[3] < 0] == [
        (64, 128, 64, -132, 4, 4), (64, 128, 64, -264, 4, 4), (64, 128, 128, -132, 4, 3), (64, 128, 128, -264, 4, 3)]
    got = {c[3] for c in kc.candidate_configs(512, 28672, 8192, 128, "operand") if c[3] < 0}
    assert got == {-132, -264}
    got = [c for c in kc.candidate_configs(16, 28672, 8192, 128, "operand") if c[3] < 0]
    assert got == [(16, 128, 128, -132, 4, 4), (16, 128, 128, -264, 4, 4), (16, 128, 128, -396, 4, 4)]
    assert [c for c in kc.candidate_configs(1, 28672, 8192, 128, "operand") if c[3] < 0] == got  # beside the GEMV
    # 4096x1024: 8 x 32 = 256 steps of 16x128x128, enough for 132 programs, not for 264
    assert [c[3] for c in kc.candidate_configs(4, 1024, 4096, 128, "operand") if c[3] < 0] == [-132]
    assert not any(c[3] < 0 for c in kc.candidate_configs(64, 128, 128, 128, "operand"))  # 2 steps


def test_operand_tiled_layout_round_trips_bit_exact():
    """"operand-tiled": the operand permutation, then the tiled placement of whole words; a 64x128
    tile of operand codes is one contiguous 4 KB run, and relayout reaches every layout from every other."""
    gen = torch.Generator().manual_seed(13)
    qweight = torch.randint(0, 256, (128, 256), generator=gen, dtype=torch.uint8)  # N=128, K=512
    laid = lay.to_operand_tiled(qweight)
    assert laid.shape == qweight.shape and laid.dtype == torch.uint8
    assert torch.equal(lay.from_operand_tiled(laid), qweight)
    # tile (1, 3): rows 64..127, operand words 48..63, stored whole as the last of the 8 tiles
    flat = laid.view(torch.int32).reshape(-1)
    start = (1 * (512 // 8 // 16) + 3) * 64 * 16
    assert torch.equal(flat[start:start + 64 * 16].reshape(64, 16), lay.to_operand(qweight).view(torch.int32)[64:, 48:])
    for src in ("canonical", *lay.RELAYOUTS):
        for dst in ("canonical", *lay.RELAYOUTS):
            assert torch.equal(lay.relayout(lay.relayout(qweight, "canonical", src), src, dst),
                               lay.relayout(qweight, "canonical", dst)), (src, dst)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(1, 64, 128, 3, 4, 3), (1, 128, 64, 2, 4, 3), (16, 64, 128, 2, 4, 3),
                                 (16, 128, 64, 1, 4, 3), (64, 64, 64, 2, 4, 3), (128, 128, 64, 1, 8, 3),
                                 (128, 64, 128, 1, 4, 3), (128, 256, 64, -3, 8, 3), (64, 128, 128, -5, 4, 3),
                                 kc.DEQUANT_CUBLAS])
def test_interpreter_operand_tiled_bound_layer_matches_reference(cfg, monkeypatch):
    """OPERAND_TILED: a bound layer of whole tiles stores its operand codes tile-major, the one copy
    that the GEMV, the tensor-core tiles (packed scales, split-K) and dequantize + cuBLAS all read;
    N a whole number of tiles but not of every BLOCK_N, act-order, fp16 activations. Layers that are
    not whole tiles keep the row-major operand layout."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    monkeypatch.setattr(settings, "OPERAND_TILED", True)
    qw, b = _bound_case(192, 768, 128, torch.float16, "cpu", True, True, seed=cfg[1] + cfg[0] + 3)
    bound = kt.BoundLinear(qw, b, config=cfg)
    assert bound.layout == "operand-tiled" and bound._dq_w is bound.weight
    assert torch.equal(bound.weight.qweight, lay.to_operand_tiled(qw.qweight))
    assert torch.equal(bound.canonical().qweight, qw.qweight)
    gen = torch.Generator().manual_seed(cfg[2])
    for m in ((1, 2) if cfg[0] <= 1 else (1, cfg[0] - 3)):
        x = torch.randn(m, 768, generator=gen).to(torch.float16)
        assert _rel(bound(x), _ref(x, qw, b)) < 3e-3, m
    if cfg == kc.DEQUANT_CUBLAS:
        dense = kt.dequantize(bound.weight, torch.float32, "operand-tiled")
        assert torch.equal(dense, kt.dequantize(qw, torch.float32))
    ragged, _ = _bound_case(40, 384, 128, torch.float16, "cpu", False, False, seed=5)
    assert kt.BoundLinear(ragged, config=(16, 64, 128, 1, 4, 3)).layout == "operand"  # not whole tiles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_scales_and_zero_points_keep_every_bit(dtype):
    """pack_scales_zeros: the scale's own 16 bits below the zero point's 8, nothing rounded."""
    gen = torch.Generator().manual_seed(21)
    qw, _ = _bound_case(40, 512, 64, dtype, "cpu", False, False, seed=22)
    qw = replace(qw, scales=(torch.randn(qw.scales.shape, generator=gen) * 3).to(dtype),
                 zeros=torch.randint(0, 16, qw.zeros.shape, generator=gen, dtype=torch.uint8))
    sz = kt.pack_scales_zeros(qw)
    assert sz.dtype == torch.int32 and sz.shape == qw.scales.shape and sz.is_contiguous()
    low = (sz & 0xFFFF).to(torch.int16).view(dtype)
    assert torch.equal(low.view(torch.int16), qw.scales.view(torch.int16))
    assert torch.equal((sz >> 16).to(torch.uint8), qw.zeros)
    with pytest.raises(ValueError, match="16-bit scales"):
        kt.pack_scales_zeros(replace(qw, scales=qw.scales.float()))


@pytest.mark.parametrize("groups", [5, 8, 11])  # a ragged last word of scales and of zero points, and none
def test_split_packed_scales_and_zero_points_keep_every_bit(groups):
    """pack_scales_zeros split (SZ_SPLIT): word (g // 2, n) holds row n's scales of groups g and g + 1,
    word (ceil(G/2) + g // 8, n) its 4-bit zero points of groups g..g+7; every bit of every scale and
    zero point comes back, the words past the last group are zero, and 2.5 bytes a row and group."""
    gen = torch.Generator().manual_seed(groups)
    qw, _ = _bound_case(48, 64 * groups, 64, torch.bfloat16, "cpu", False, False, seed=groups + 1)
    qw = replace(qw, scales=(torch.randn(qw.scales.shape, generator=gen) * 3).to(torch.bfloat16),
                 zeros=torch.randint(0, 16, qw.zeros.shape, generator=gen, dtype=torch.uint8))
    sz = kt.pack_scales_zeros(qw, split=True)
    g2, g8 = -(-groups // 2), -(-groups // 8)
    assert sz.dtype == torch.int32 and sz.shape == (g2 + g8, 48) and sz.is_contiguous()
    assert kt.sz_format(sz, 48, groups) == 2 and kt.sz_format(kt.pack_scales_zeros(qw), 48, groups) == 1
    for g in range(groups):
        s = ((sz[g // 2] >> (16 * (g % 2))) & 0xFFFF).to(torch.int16)
        assert torch.equal(s, qw.scales[:, g].contiguous().view(torch.int16)), g
        z = (sz[g2 + g // 8] >> (4 * (g % 8))) & 0xF
        assert torch.equal(z.to(torch.uint8), qw.zeros[:, g]), g
    if groups % 2:
        assert not (sz[g2 - 1] >> 16).any()
    if groups % 8:
        assert not (sz[-1] >> (4 * (groups % 8))).any()
    with pytest.raises(ValueError, match="zero points above 15"):
        kt.pack_scales_zeros(replace(qw, zeros=qw.zeros + 16), split=True)
    with pytest.raises(ValueError, match="fit neither"):
        kt.sz_format(sz[1:], 48, groups)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(16, 64, 128, 3, 4, 3), (16, 128, 128, -4, 4, 3), (64, 64, 64, 2, 4, 3),
                                 (128, 64, 128, 1, 4, 3)])
def test_interpreter_operand_tiles_read_split_scales(cfg, monkeypatch):
    """A bound operand-tiled layer under SZ_SPLIT keeps the split words and its tiles read them (five
    groups: a ragged last word of each kind): the product of the [N, groups] words bit for bit, within
    3e-3 of float64 through the same dequantized weight; a layer whose zero points pass 4 bits keeps
    none and reads its own."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    qw, b = _bound_case(192, 640, 128, torch.float16, "cpu", False, True, seed=cfg[1] + 5)
    whole = kt.BoundLinear(qw, b, config=cfg)
    monkeypatch.setattr(settings, "SZ_SPLIT", True)
    split = kt.BoundLinear(qw, b, config=cfg)
    assert split.layout == "operand-tiled" and split._sz.shape == (3 + 1, 192)
    gen = torch.Generator().manual_seed(cfg[0] + 9)
    for m in (1, cfg[0] - 3, cfg[0] + 5):
        x = torch.randn(m, 640, generator=gen).to(torch.float16)
        y = split(x)
        assert _rel(y, _ref(x, qw, b)) < 3e-3, m
        assert torch.equal(y, whole(x)), m
        assert split.plans[m].s_ptr == split._sz.data_ptr()
    wide = replace(qw, zeros=qw.zeros.to(torch.int32) + 16)  # a zero point that needs 5 bits
    assert kt.BoundLinear(wide, b, config=cfg)._sz is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
@pytest.mark.parametrize("cfg", [(16, 64, 128, 3, 4, 3), (64, 64, 64, 2, 4, 3), (128, 64, 64, 1, 8, 3)])
def test_interpreter_operand_tiles_read_packed_scales(cfg, monkeypatch):
    """A bound operand layer with 16-bit scales keeps them packed with the zero points
    (SCALES_PACKED) and its tensor-core tiles read those words. The product is the one of the
    separate loads, bit for bit, and within 3e-3 of float64 through the same dequantized weight
    (fp16 activations, weights rounded to fp16 after the scale; the interpreter runs no bf16)."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    qw, b = _bound_case(72, 640, 128, torch.float16, "cpu", False, True, seed=cfg[0] + 7)
    bound = kt.BoundLinear(qw, b, config=cfg)
    assert bound.layout == "operand" and bound._sz is not None
    gen = torch.Generator().manual_seed(cfg[1])
    outs = {}
    for m in (1, cfg[0] - 3):
        x = torch.randn(m, 640, generator=gen).to(torch.float16)
        outs[m] = (x, bound(x))
        assert _rel(outs[m][1], _ref(x, qw, b)) < 3e-3, m
        assert bound.plans[m].s_ptr == bound._sz.data_ptr()
    monkeypatch.setattr(settings, "SCALES_PACKED", False)
    apart = kt.BoundLinear(qw, b, config=cfg)
    assert apart._sz is None
    for m, (x, y) in outs.items():
        assert torch.equal(apart(x), y), m
    with pytest.raises(ValueError, match="operand tiles only"):
        kt.launch(x, qw, torch.empty_like(y), cfg, sz=kt.pack_scales_zeros(qw))  # canonical codes


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_packed_scales_follow_the_weight_and_the_gemv_reads_its_own(monkeypatch):
    """The tuner's M=1 pick is a GEMV, which reads the layer's own scales; a tile reads the packed
    words. Scales and zero points overwritten in place (a state dict loaded into the same buffers)
    reach both after weights_changed(), the packed words at their old address (plans and captured
    graphs hold it)."""
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    qw, b = _bound_case(72, 640, 128, torch.float16, "cpu", False, True, seed=31)
    bound = kt.BoundLinear(qw, b)
    gen = torch.Generator().manual_seed(32)
    xs = {m: torch.randn(m, 640, generator=gen).to(torch.float16) for m in (1, 20)}
    for m, x in xs.items():
        assert _rel(bound(x), _ref(x, qw, b)) < 3e-3, m
    assert bound.plans[1].cfg[0] == 1 and bound.plans[1].s_ptr == qw.scales.data_ptr()
    assert bound.plans[20].cfg[0] > 1 and bound.plans[20].s_ptr == bound._sz.data_ptr()
    other, _ = _bound_case(72, 640, 128, torch.float16, "cpu", False, False, seed=33)
    address = bound._sz.data_ptr()
    bound.weight.qweight.copy_(lay.to_operand(other.qweight))
    bound.weight.scales.copy_(other.scales)
    bound.weight.zeros.copy_(other.zeros)
    bound.weights_changed()
    assert bound._sz.data_ptr() == address
    new = replace(qw, qweight=other.qweight, scales=other.scales, zeros=other.zeros)
    for m, x in xs.items():
        assert _rel(bound(x), _ref(x, new, b)) < 3e-3, m


def test_operand_tiles_stage_their_scales_asynchronously_in_sass():
    """The operand tiles' K loop reads the packed scales and zero points, as [N, groups] words or split, by
    asynchronous copies (LDGSTS) like the codes, with no synchronous global load left in it. Read separately
    (2-byte scales, 1-byte zero points: below the 4 bytes of a copy), Triton's pipeliner left them as LDG.E.U16
    and LDG.E.U8 in the loop, waited on at each group (no GPU needed to see it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm").exists():
        pytest.skip("this Triton has no bundled nvdisasm")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, str(root / "benchmarks" / "sass_counts.py"), "--modes", "operand", "--count", "LDG.E,LDGSTS",
            "--config", "16,64,128,1,4,3", "--config", "128,128,64,1,8,3"]
    lines = {}
    for flag in ("", "--unpacked", "--sz-split"):  # the split words (SZ_SPLIT) are 4-byte loads too
        r = subprocess.run(args + ([flag] if flag else []), capture_output=True, text=True, env=env, timeout=600,
                           cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        lines[flag] = [ln for ln in r.stdout.splitlines() if "operand" in ln]
    for flag in ("", "--sz-split"):
        assert len(lines[flag]) == 2 and all("[LDG.E: 0]" in ln for ln in lines[flag]), lines[flag]
    assert all("[LDG.E: 0]" not in ln for ln in lines["--unpacked"]), lines["--unpacked"]


def test_operand_mode_tunes_tensor_core_tiles_inside_one_group():
    for m in (1, 16, 64, 128, 512):
        cfgs = kc.candidate_configs(kc.m_bucket(m), 4096, 4096, 128, layout="operand")
        assert cfgs and all(c == kc.DEQUANT_CUBLAS or (c[2] <= 128 and c[2] % 32 == 0) for c in cfgs)
        assert any(c[0] == 1 for c in cfgs) == (m == 1)  # the GEMV beside the 16-row tiles at M=1
    assert (256, 128, 64, 1, 8, 3) in kc.candidate_configs(512, 4096, 4096, 128, layout="operand")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_operand_codes_refuse_a_launch_that_would_misread_them(monkeypatch):
    qw, _ = _bound_case(64, 256, 128, torch.float32, "cpu", False, False, seed=4)
    laid = replace(qw, qweight=lay.to_operand(qw.qweight))
    out = torch.empty(2, 64)
    monkeypatch.setattr(settings, "CODE_MODE", "asm")
    with pytest.raises(ValueError, match="operand layout need"):
        kt.launch(torch.randn(2, 256), laid, out, (16, 64, 128, 1, 4, 3), layout="operand")
    monkeypatch.setattr(settings, "CODE_MODE", "operand")
    with pytest.raises(ValueError, match="operand layout need"):
        kt.launch(torch.randn(2, 256), laid, out, (16, 64, 256, 1, 4, 3), layout="operand")  # a tile over two groups
    with pytest.raises(ValueError, match="operand layout need"):  # float offsets
        kt.launch(torch.randn(2, 256), _with_offsets(laid, torch.float32, seed=1), out, (16, 64, 128, 1, 4, 3),
                  layout="operand")


def test_operand_tiles_keep_their_wgmma_pipelined_in_ptxas():
    """ptxas (Triton's own, for sm_90a; no GPU needed) accepts the operand tiles' wgmma as a pipeline.
    A K loop that may run zero times zero-fills the accumulator on a path that meets the loop's
    wgmma before their last wait, and ptxas then serializes every wgmma (warning C7515): that was
    every operand tile, M = 16 to 512, until the loop was made to run at least once. A tile whose
    accumulator does not fit the registers spills and is serialized too (C7511): not a candidate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    # Every operand tile the tuner tries at M = 128 and 512 on a Llama-3-70B shape, and an M=16 one.
    tiles = {c for m in (128, 512) for c in kc.candidate_configs(m, 28672, 8192, 128, "operand")
             if c != kc.DEQUANT_CUBLAS} | {(16, 128, 128, 1, 8, 3)}
    cfgs = [",".join(map(str, c)) for c in sorted(tiles)]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "sass_counts.py"), "--modes", "operand", "--ptxas",
                        *[a for c in cfgs for a in ("--config", c)]], capture_output=True, text=True, env=env,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    verdicts = [ln for ln in r.stdout.splitlines() if "ptxas:" in ln]
    assert len(verdicts) == len(cfgs) and all("no performance warning" in v for v in verdicts), r.stdout


def test_split_k_never_leaves_a_split_empty():
    """The tile kernel runs every split at least once, so configurations with an empty split are
    not candidates and are refused when given."""
    assert kc.splits(8192, 64, 4) and kc.splits(576, 64, 2)
    assert not kc.splits(576, 64, 4)  # 9 K-tiles in splits of 3: the fourth has none
    assert not kc.splits(576, 64, 8)
    assert kc.splits(1152, 256, 4)  # a ragged K masks every tile: an empty last split adds zeros
    for m in (16, 64, 128, 512):
        for layout in ("canonical", "operand"):
            for c in kc.candidate_configs(m, 576, 576, 64, layout):
                assert c == kc.DEQUANT_CUBLAS or c[0] == 1 or kc.splits(576, c[2], c[3]), (m, layout, c)
    qw = quantize_rtn(torch.randn(64, 576, generator=torch.Generator().manual_seed(5)), QuantSpec(group_size=64))
    x = torch.randn(16, 576)
    with pytest.raises(ValueError, match="leaves a split empty"):
        kt.launch(x, qw, torch.empty(16, 64), (16, 64, 64, 4, 4, 3))


def test_candidate_run_leaves_out_a_ws_tile_where_the_layer_has_no_packed_scales():
    """What the tuner is handed (TUNER's candidate_run): a ws tile reads packed scales of operand-tiled
    codes, so without them it is no candidate (None, nothing launched); any other tile is a launch."""
    w = quantize_rtn(torch.randn(256, 512), QuantSpec(group_size=128), scale_dtype=torch.float32)
    x, out = torch.randn(64, 512), torch.empty(64, 256)
    ws_cfg = (64, 128, 128, 1, kc.WS_WARPS, 4)
    assert kt.candidate_run(ws_cfg, x, out, None, w, None, "operand-tiled", None) is None
    assert kt.candidate_run(ws_cfg, x, out, None, w, w, "operand-tiled", None) is None
    assert callable(kt.candidate_run((32, 64, 64, 1, 4, 3), x, out, None, w, None, "canonical", None))
    assert kt.TUNER.run_candidate is kt.candidate_run


@triton.jit
def _neg_magic_kernel(z_ptr, out_ptr, DT: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, neg_magic_zero(tl.load(z_ptr + i), DT))


def _bias_bits_match(dtype: torch.dtype, two_e: float, device: str) -> None:
    z = torch.randperm(16, dtype=torch.int32, device=device)
    out = torch.empty_like(z)
    _neg_magic_kernel[(1,)](z, out, tl.float16 if dtype == torch.float16 else tl.bfloat16, 16)
    want = (-(two_e + z.double())).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(out, want), (out, want)


@pytest.mark.parametrize("dtype, two_e", [(torch.bfloat16, 128.0), (torch.float16, 1024.0)])
def test_the_bit_tricks_bias_is_built_by_integer_ops_to_the_same_bits(dtype, two_e):
    """int4_codes.neg_magic_zero, which the tiles subtract (q - z by (2^e + q) - (2^e + z)): for every INT4
    zero point, in a fresh order, the bits of -(2^e + z) rounded to the dtype as the float path gave them
    (in Triton's interpreter on a CPU-only machine, compiled on a GPU)."""
    _bias_bits_match(dtype, two_e, "cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, two_e", [(torch.bfloat16, 128.0), (torch.float16, 1024.0)])
def test_gpu_the_bit_tricks_bias_is_built_by_integer_ops_to_the_same_bits(dtype, two_e):
    """The same, compiled (the GPU runs select -m gpu)."""
    _bias_bits_match(dtype, two_e, "cuda")

"""The Triton INT4 kernel against the reference, on fresh random inputs, output poisoned first.

Without CUDA these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) on
small shapes; with CUDA (`-m gpu`) on the real compiler over many shapes in bf16/fp16.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from quantbridge.kernels import int4_triton as kt  # noqa: E402
from quantbridge.packed import quantize_rtn  # noqa: E402
from quantbridge.spec import QuantSpec  # noqa: E402


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
    (40, 36, 256, 128, True, kt.DEQUANT_CUBLAS),       # large-M path: Triton dequantize + matmul
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
    # K=384 is 3 tiles of 128 over 4 splits: the last split has no tile. Memory after the
    # scales is NaN, so any read past the last group shows up in the output.
    x, qw, ref = _case(3, 50, 384, 128, False, torch.float32, "cpu", seed=11)
    buf = torch.full((qw.scales.numel() + 64,), float("nan"))
    buf[: qw.scales.numel()] = qw.scales.flatten()
    qw.scales = buf[: qw.scales.numel()].view_as(qw.scales)
    _check(x, qw, ref, (16, 32, 128, 4, 4, 3), 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter cases run on CPU-only machines")
def test_interpreter_act_order_through_public_entry():
    x, qw, ref = _case(4, 32, 256, 64, False, torch.float32, "cpu", act_order=True, seed=5)
    out = kt.int4_linear(x, qw)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_configs_are_valid_for_shapes():
    for m in (1, 2, 16, 64, 128, 4096):
        cfgs = kt.candidate_configs(kt.m_bucket(m), 4096, 4096, 128)
        assert cfgs and all(c == kt.DEQUANT_CUBLAS or (c[2] % 2 == 0 and c[3] >= 1) for c in cfgs)
        # GEMV tiles only for the smallest M, each inside one group
        assert all(c[0] != 1 or (m <= 2 and 128 % c[2] == 0) for c in cfgs)
    assert kt.m_bucket(1) == 1 and kt.m_bucket(3) == 4 and kt.m_bucket(5000) == 4096


# One configuration per kernel path, so the GPU tests compile a handful of kernels
# instead of tuning every shape (the tuner itself is tested once below).
GPU_CONFIGS = [(1, 64, 32, 4, 4, 3), (16, 64, 256, 4, 4, 3), (16, 64, 128, 4, 4, 3), (32, 64, 64, 2, 4, 3), (128, 128, 64, 1, 8, 3),
               kt.DEQUANT_CUBLAS]
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
def test_gpu_tuner_picks_a_correct_config_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(tmp_path))
    tuner = kt._Tuner()
    x, qw, ref = _case(16, 2048, 1024, 128, False, torch.bfloat16, "cuda", seed=3)
    cfg = tuner.config(x, qw)
    _check(x, qw, ref, cfg, 1e-2)
    cached = list(tmp_path.glob("triton-int4-*.json"))
    assert len(cached) == 1 and "m16-n2048-k1024-g128-bfloat16" in cached[0].read_text()
    again = kt._Tuner()
    again._search = None  # a second tuner must read the file, not search again
    assert again.config(x, qw) == cfg


@pytest.mark.gpu
def test_gpu_act_order_and_bias_via_native_backend():
    from quantbridge.backend import get

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
    cfg = (16, 64, 128, 4, 4, 3)
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

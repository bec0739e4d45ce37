"""The serving runtime without vLLM: layers by index, the custom op under torch.compile, the
per-worker profiler (CPU timers here, CUDA events on a GPU) and serve-stats' merge."""

import json
import os

import pytest
import torch
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.plugin.backend import get
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec
from quantbridge.vllm import profiler as prof
from quantbridge.vllm import runtime
from quantbridge.vllm.stats import load_workers, merge, steps, tokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture
def profiling(tmp_path, monkeypatch):
    """A fresh profiler for this test, writing under tmp_path."""
    monkeypatch.setenv(prof.ENV_DIR, str(tmp_path / "profile"))
    monkeypatch.setattr(prof, "_PROFILER", None)
    p = prof.profiler()
    p.meta.update(backend="native", tp_rank=0, tp_size=1, device="test", model="t")
    yield p
    p.close()
    monkeypatch.setattr(prof, "_PROFILER", None)


def _layers(device: str, n_layers: int = 3) -> list[tuple[int, torch.Tensor]]:
    """(runtime index, float64 dequantized weight) of native layers built from RTN codes."""
    out = []
    for i in range(n_layers):
        w = torch.randn(256, 256, generator=torch.Generator().manual_seed(i)) * 0.05
        q = quantize_rtn(w, QuantSpec(group_size=128)).to(device)
        kernel = get("native").from_int4(q, None)
        idx = runtime.add_layer(f"layers.{i}.proj", kernel)
        out.append((idx, q.dequantize(torch.float64).cpu()))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
def test_profiled_layers_count_every_step(profiling, device, compiled):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layers = _layers(device)
    for idx, _ in layers:
        name, kernel = runtime._LAYERS[idx]
        profiling.describe(name, shape=[256, 256], kernel=kernel.kernel, weight_bytes=kernel.weight_nbytes)

    def model(x):
        for idx, _ in layers:
            x = runtime.run(x, idx)
        return x

    fn = torch.compile(model, dynamic=True, fullgraph=True) if compiled else model  # no graph breaks allowed
    dtype = torch.float32
    ms = [1, 3, 8, 3, 1, 1]
    for m in ms:
        x = torch.randn(m, 256, device=device, dtype=dtype)
        y = fn(x)
        ref = x.double().cpu()
        for _, w in layers:
            ref = ref @ w.T
        # Three INT4 layers in float32 against float64 on the same dequantized weights.
        assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-4
    profiling.flush(wait=True)
    comp = merge(load_workers(profiling.dir))
    assert set(steps(comp).values()) == {len(ms)} and set(tokens(comp).values()) == {sum(ms)}
    for r in comp.backends[0].layers:
        assert {m: v["count"] for m, v in r.latency_us.items()} == {"1": 3, "3": 2, "8": 1}
        assert all(0 < v["p10"] <= v["median"] <= v["p90"] < 1e6 for v in r.latency_us.values())
    if device == "cuda":
        assert not profiling.pending  # every event pair resolved at the final flush


def test_flush_is_atomic_and_serve_stats_merges_ranks(tmp_path):
    """Two ranks of one TP group: counts are rank 0's, samples pooled; the CLI writes results.json."""
    d = tmp_path / "p"
    for rank in (0, 1):
        p = prof.Profiler(d, {"backend": "native", "tp_rank": rank, "tp_size": 2, "device": "cpu", "model": "m"},
                          flush_s=3600)
        p.path = d / f"worker-r{rank}.json"
        p.describe("a", shape=[8, 8], kernel="k", weight_bytes=40)
        for m in (1, 1, 4):
            p.stop(p.start(torch.zeros(1)), "a", m, False)
        p.stop(p.start(torch.zeros(1)), "a", 2, True)  # a warm-up call is kept apart
        p.close()
    assert not list(d.glob(".*tmp"))  # no temp file left behind
    comp = merge(load_workers(d))
    r = comp.backends[0].layers[0]
    assert r.latency_us["1"]["count"] == 2 and r.latency_us["1"]["n"] == 4  # rank 0's count, both ranks' samples
    assert comp.backends[0].model_metrics["warmup_calls"] == {"a": 2}
    res = CliRunner().invoke(cli, ["serve-stats", str(d)])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "results.json").read_text())["backends"][0]["name"] == "vllm:native"
    res = CliRunner().invoke(cli, ["serve-stats", str(tmp_path / "none")])
    assert res.exit_code == 2 and "QUANTBRIDGE_PROFILE_DIR" in res.output


def test_profiling_off_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(prof.ENV_DIR, raising=False)
    monkeypatch.setattr(prof, "_PROFILER", None)
    assert prof.profiler() is None
    (idx, w), = _layers("cpu", 1)
    x = torch.randn(2, 256)
    assert runtime.run(x, idx).shape == (2, 256) and prof._PROFILER is None
    assert not os.listdir(tmp_path)

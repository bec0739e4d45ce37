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
from quantbridge.vllm import graphs
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


def _assert_chain(y: torch.Tensor, x: torch.Tensor, layers) -> None:
    """The layers' output against float64 through the same dequantized weights (INT4 layers in float32)."""
    ref = x.double().cpu()
    for _, w in layers:
        ref = ref @ w.T
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-4


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
        _assert_chain(y, x, layers)
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
        p.flush()  # the file written at close carries this flush's own time
        p.close()
    assert not list(d.glob(".*tmp"))  # no temp file left behind
    w = json.loads((d / "worker-r0.json").read_text())
    assert w["schema"] == 2 and w["flush_ms"]["count"] == 1 and w["flush_ms"]["total"] > 0
    assert all(isinstance(v, int) and v > 0 for v in w["layers"]["a"]["m"]["1"]["samples_ns"])
    comp = merge(load_workers(d))
    r = comp.backends[0].layers[0]
    assert r.latency_us["1"]["count"] == 2 and r.latency_us["1"]["n"] == 4  # rank 0's count, both ranks' samples
    assert comp.backends[0].model_metrics["warmup_calls"] == {"a": 2}
    res = CliRunner().invoke(cli, ["serve-stats", str(d)])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "results.json").read_text())["backends"][0]["name"] == "vllm:native"
    assert "profile flushes: 2 in 2 worker(s)" in res.output
    # the tokens/s of unprofiled and profiled servers (benchmarks/vllm_serve_gpu.py), with a profiled
    # server whose FULL graphs' twins never ran reported apart
    (d / "overhead.json").write_text(json.dumps({
        "tokens_per_s_off": 8908.0, "tokens_per_s_on": 8608.9, "change_pct": -3.36, "source": "test",
        "by_full_every": {"1000000": {"tokens_per_s": 8820.0, "change_pct": -0.99, "rounds": 8, "single": 690.0}}}))
    res = CliRunner().invoke(cli, ["serve-stats", str(d)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "8908.0 tokens/s unprofiled, 8608.9 profiled (-3.4 %)" in out
    assert "with the FULL graphs' probed twins one step in 1000000: 8820.0 tokens/s (-1.0 %, 8 rounds)" in out
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


class _FakeEvent:
    """Stands in for a CUDA event on the CPU: `done` says whether the GPU has reached it."""

    def __init__(self, us: float = 0.0) -> None:
        self.done, self.us, self.waited = False, us, False

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.us - self.us) / 1e3


def _markers():
    """(the markers made so far, a factory of fake marker events that records them)."""
    made: list[_FakeEvent] = []

    def new_marker() -> _FakeEvent:
        made.append(_FakeEvent())
        return made[-1]
    return made, new_marker


def test_graph_reads_only_completed_replays_and_waits_when_starved(profiling):
    """A captured graph's events are read before its next replay only when the marker behind
    the previous replay has completed; a pending marker is dropped (no wait) until FORCE_FACTOR
    x EVERY replays went unread, then the read waits. Every replay is counted."""
    markers, new_marker = _markers()
    g = graphs.Graph(m=4, every=2, new_marker=new_marker)
    g.add("layers.0.proj", _FakeEvent(0.0), _FakeEvent(7.0))
    g.add("layers.1.proj", _FakeEvent(7.0), _FakeEvent(10.0))

    def replay(gpu_done: bool) -> None:
        g.before_replay(profiling)
        g.after_replay(warmup=False)
        if gpu_done and g.marker is not None:
            g.marker.done = True

    replay(True)  # 1: no read due yet (every=2)
    assert g.marker is None
    replay(False)  # 2: marker recorded, GPU not there yet
    replay(True)  # 3: the marker of 2 is still pending -> dropped; a new one follows 3 and completes
    assert g.dropped == 1 and g.reads == 0
    replay(True)  # 4: marker of 3 completed -> read
    assert g.reads == 1 and profiling.graph_stats[("layers.0.proj", 4)].samples_us == [7.0]
    for _ in range(8):  # the GPU never catches up: after 4 x every replays unread, one read waits
        replay(False)
    assert g.forced == 1 and any(m.waited for m in markers)
    g.after_replay(warmup=True)
    assert g.replays == 12 and g.warmup_replays == 1
    profiling.graphs[("wrapper", 4)] = g
    profiling.flush()
    comp = merge(load_workers(profiling.dir))
    graph = comp.backends[1]
    assert graph.timing == "graph" and graph.name.endswith("[graph]")
    v = {r.name: r.latency_us["4"] for r in graph.layers}
    assert v["layers.0.proj"]["count"] == 12 and v["layers.0.proj"]["replays_read"] == g.reads
    assert v["layers.1.proj"]["median"] == 3.0
    assert steps(comp)["layers.0.proj"] == 12 and tokens(comp)["layers.0.proj"] == 48


class _DoneEvent(_FakeEvent):
    def __init__(self) -> None:
        super().__init__()
        self.done = True


class _Mode:
    NONE, PIECEWISE, FULL = "none", "piecewise", "full"


class _Desc(tuple):
    """Stands in for vLLM's BatchExecutionDescriptor (frozen, hashable)."""

    cg_mode = property(lambda self: self[0])
    num_tokens = property(lambda self: self[1])


class _Manager:
    """The shape of vLLM's second model runner's CudaGraphManager (vllm/v1/worker/gpu/cudagraph_utils.py):
    `_capture_descs` by mode; per FULL descriptor forward(NONE) once as warm-up, then again inside the
    capture, the graph stored in `graphs`; PIECEWISE descriptors run through forward(PIECEWISE);
    run_fullgraph replays `graphs[desc]`. `capturing` stands for torch.cuda.is_current_stream_capturing()."""

    capturing = False

    def __init__(self, descs):
        self._capture_descs = {}
        for d in descs:
            self._capture_descs.setdefault(d.cg_mode, []).append(d)
        self.graphs, self.replayed, self.captured = {}, [], 0

    def capture(self, create_forward_fn, progress_bar_desc="Capturing CUDA graphs"):
        for mode in (_Mode.PIECEWISE, _Mode.FULL):
            for desc in self._capture_descs.get(mode, []):
                create_forward_fn(desc, warmup=True)(_Mode.NONE)
                forward = create_forward_fn(desc, warmup=False)
                if desc.cg_mode == _Mode.PIECEWISE:
                    forward(_Mode.PIECEWISE)
                    continue
                assert desc not in self.graphs
                _Manager.capturing = True
                try:
                    forward(_Mode.NONE)
                finally:
                    _Manager.capturing = False
                self.captured += 1
                self.graphs[desc] = f"graph{self.captured}"

    def run_fullgraph(self, desc):
        self.replayed.append(self.graphs[desc])
        return desc.num_tokens


class _Runner:
    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False):
        return manager.run_fullgraph(scheduler_output)


manager: _Manager


def test_full_graphs_of_the_second_model_runner_are_timed_through_probed_twins(profiling, monkeypatch):
    """vLLM's own FULL graphs are captured without timers and replay every step; each FULL descriptor
    is captured once more with the layers' event pairs (only in its captured pass; both warm-up
    passes are marked as warm-up), and that twin replaces vLLM's graph on one step in EVERY, its
    events read afterwards. Replays inside execute_model(dummy_run=True) count as warm-up."""
    global manager
    monkeypatch.setattr(_Manager, "capture", _Manager.capture)
    monkeypatch.setattr(_Manager, "run_fullgraph", _Manager.run_fullgraph)
    monkeypatch.setattr(_Runner, "execute_model", _Runner.execute_model)
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)  # the read markers: the GPU is always done
    every = 4
    graphs.wrap_full_graphs(_Manager, _Mode.FULL, _Mode.NONE, every=every)
    graphs.wrap_full_graphs(_Manager, _Mode.FULL, _Mode.NONE, every=every)  # idempotent
    graphs.wrap_dummy_runs(_Runner)
    graphs.wrap_dummy_runs(_Runner)
    full4, full1, pw8 = _Desc((_Mode.FULL, 4)), _Desc((_Mode.FULL, 1)), _Desc((_Mode.PIECEWISE, 8))
    manager = _Manager([pw8, full4, full1])
    rng = torch.Generator().manual_seed(11)
    times = {name: float(torch.rand(1, generator=rng)) * 50 + 1 for name in ("l0", "l1")}
    seen = []

    def create_forward_fn(desc, warmup):
        def forward(mode):
            key = graphs.capture_key()
            seen.append((desc.num_tokens, mode, _Manager.capturing, graphs.in_warmup(), key))
            if _Manager.capturing and key is not None:
                t = 0.0
                for name, us in times.items():
                    a, b = _FakeEvent(t), _FakeEvent(t + us)
                    a.done = b.done = True
                    key.add(name, a, b)
                    t += us
        return forward
    manager.capture(create_forward_fn)
    # vLLM's graphs (graph1: M=4, graph2: M=1) stay its own; the twins (graph3, graph4) are ours
    assert manager.graphs == {full4: "graph1", full1: "graph2"} and manager.captured == 4
    assert manager._capture_descs == {_Mode.PIECEWISE: [pw8], _Mode.FULL: [full4, full1]}
    # the twins live on the manager (dropped with it); the profiler reports one once it serves a step
    assert {d: cg for d, (g, cg) in manager._quantbridge_twins.items()} == {full4: "graph3", full1: "graph4"}
    twins = {g.m: g for g, _ in manager._quantbridge_twins.values()}
    assert all(g.kind == "full" for g in twins.values()) and len(twins[4].pairs) == 2
    assert profiling.graphs == {}
    assert all(warm for *_, warm, _ in seen)  # every pass of a capture is warm-up, not a served step
    keyed = [(m, capturing) for m, mode, capturing, warm, key in seen if key is not None]
    assert keyed == [(4, False), (4, True), (1, False), (1, True)]  # only the second pass carries keys
    assert not graphs.in_warmup()
    for _ in range(3 * every):
        assert _Runner().execute_model(full4) == 4
    _Runner().execute_model(full1, None, True)  # dummy steps: vLLM's warm-up
    _Runner().execute_model(full1, dummy_run=True)
    assert not graphs.in_warmup() and list(profiling.graphs.values()) == [twins[4]]
    _Runner().execute_model(full1)  # a served step: now reported, its warm-up replays with it
    assert manager.replayed == (["graph1"] * (every - 1) + ["graph3"]) * 3 + ["graph2"] * 3
    g4, g1 = twins[4], twins[1]
    assert (g4.replays, g4.probed, g4.warmup_replays, g1.replays, g1.warmup_replays) == (12, 3, 0, 1, 2)
    assert g4.reads == 2  # a twin replay is read (its marker completed) at the graph's next step
    _Runner().execute_model(full4)
    assert g4.reads == 3 and g4.replays == 13 and manager.replayed[-1] == "graph1"
    for name, us in times.items():
        assert profiling.graph_stats[(name, 4)].samples_us == pytest.approx([us] * 3, abs=5e-4)  # kept in whole ns
    assert ("l0", 1) not in profiling.graph_stats
    profiling.describe("l0", shape=[8, 8], kernel="k", weight_bytes=40)
    profiling.describe("l1", shape=[8, 8], kernel="k", weight_bytes=40)
    profiling.flush()
    res = CliRunner().invoke(cli, ["serve-stats", str(profiling.dir)])
    assert res.exit_code == 0, res.output
    assert ("2 captured full graphs with quantized layers (batch sizes 1, 4); replays 14, read 3 (of which waited "
            "for 0), warm-up replays 2; timed on the probed twins' 3 replays, one step in 4") in " ".join(res.output.split())


def test_a_failed_twin_capture_leaves_vllms_graphs_serving_untimed(profiling, monkeypatch, capsys):
    """If capturing the probed twins fails, vLLM's own graphs (captured first) stay in place and
    replay untimed, the manager's state is as vLLM left it, and the cause is printed in one line."""
    global manager
    monkeypatch.setattr(_Manager, "capture", _Manager.capture)
    monkeypatch.setattr(_Manager, "run_fullgraph", _Manager.run_fullgraph)
    graphs.wrap_full_graphs(_Manager, _Mode.FULL, _Mode.NONE, every=2)
    full2 = _Desc((_Mode.FULL, 2))
    manager = _Manager([full2])
    passes = []

    def create_forward_fn(desc, warmup):
        def forward(mode):
            passes.append(graphs.capture_key())
            if _Manager.capturing and graphs.capture_key() is not None:
                raise RuntimeError("out of memory in the second capture")
        return forward
    manager.capture(create_forward_fn)
    assert manager.graphs == {full2: "graph1"} and manager._capture_descs == {_Mode.FULL: [full2]}
    assert manager._quantbridge_twins == {} and len(passes) == 4  # two passes of warm-up + capture
    err = capsys.readouterr().err
    assert "probed twins of the FULL CUDA graphs could not be captured (RuntimeError: out of memory" in err
    for _ in range(3):
        manager.run_fullgraph(full2)
    assert manager.replayed == ["graph1"] * 3 and not graphs.in_warmup() and profiling.graphs == {}


def test_twins_belong_to_their_manager_and_go_with_it(profiling, monkeypatch):
    """vLLM 0.32 captures once with a throwaway manager to size graph memory, then drops it: that
    manager's twins must not stay reachable from the profiler (they would hold its pool and its
    output buffer), and a later manager replays only its own twins."""
    import gc
    import weakref

    monkeypatch.setattr(_Manager, "capture", _Manager.capture)
    monkeypatch.setattr(_Manager, "run_fullgraph", _Manager.run_fullgraph)
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)
    graphs.wrap_full_graphs(_Manager, _Mode.FULL, _Mode.NONE, every=2)
    desc = _Desc((_Mode.FULL, 2))

    def create_forward_fn(d, warmup):
        def forward(mode):
            key = graphs.capture_key()
            if _Manager.capturing and key is not None:
                a, b = _FakeEvent(0.0), _FakeEvent(3.0)
                a.done = b.done = True
                key.add("l0", a, b)
        return forward

    throwaway = _Manager([desc])
    throwaway.capture(create_forward_fn)
    gone = weakref.ref(throwaway._quantbridge_twins[desc][0])
    del throwaway
    gc.collect()
    assert gone() is None and profiling.graphs == {}
    served = _Manager([desc])
    served.capture(create_forward_fn)
    for _ in range(4):
        served.run_fullgraph(desc)
    assert served.replayed == ["graph1", "graph2", "graph1", "graph2"]
    assert [g.probed for g in profiling.graphs.values()] == [2]


def test_piecewise_wrapper_times_captured_layers_and_counts_served_replays(profiling, monkeypatch):
    """A stand-in shaped like vLLM's CUDAGraphWrapper (an entry per batch descriptor, captured on
    its first call, replayed after): the layers captured add their event pairs, every served replay
    is counted and is activity for the idle flush, replays without attention metadata (warm-up)
    are neither, and a read every EVERY replays gives the layer's time at the graph's batch size."""
    from types import SimpleNamespace

    class Entry:
        cudagraph = None

    us = float(torch.rand(1, generator=torch.Generator().manual_seed(9))) * 30 + 1

    class Wrapper:
        runtime_mode = _Mode.PIECEWISE

        def __init__(self):
            self.concrete_cudagraph_entries = {}

        def __call__(self):
            entry = self.concrete_cudagraph_entries.setdefault(fc.batch_descriptor, Entry())
            if entry.cudagraph is None:  # capturing: the quantized layer records its event pair
                a, b = _FakeEvent(0.0), _FakeEvent(us)
                a.done = b.done = True
                graphs.capture_key().add("l0", a, b)
                entry.cudagraph = "graph"
            return "out"

    monkeypatch.setattr(Wrapper, "__call__", Wrapper.__call__)
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)
    fc = SimpleNamespace(cudagraph_runtime_mode=_Mode.PIECEWISE, batch_descriptor=_Desc((_Mode.PIECEWISE, 8)),
                         attn_metadata=object())
    graphs._wrap_piecewise(Wrapper, _Mode, lambda: fc, lambda: True, every=2)
    w = Wrapper()
    assert w() == "out"  # captures
    (graph,) = profiling.graphs.values()
    calls = profiling.calls
    for _ in range(5):
        assert w() == "out"
    fc.attn_metadata = None  # vLLM's warm-up passes run without attention metadata
    w()
    assert (graph.replays, graph.warmup_replays, profiling.calls - calls) == (5, 1, 5)
    assert graph.reads == 2 and profiling.graph_stats[("l0", 8)].samples_us == pytest.approx([us] * 2, abs=5e-4)


def test_steps_that_only_replay_graphs_are_flushed_when_the_worker_goes_idle(profiling, monkeypatch):
    """A decode step that replays a FULL graph calls no layer. Such steps alone (a single request
    decoding after the last prefill) must still reach the file once the worker goes idle: vLLM
    SIGKILLs its workers on shutdown, so no exit hook writes them later. Dummy replays (warm-up)
    are not activity."""
    import time

    monkeypatch.setattr(_Manager, "capture", _Manager.capture)
    monkeypatch.setattr(_Manager, "run_fullgraph", _Manager.run_fullgraph)
    monkeypatch.setattr(_Runner, "execute_model", _Runner.execute_model)
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)
    global manager
    graphs.wrap_full_graphs(_Manager, _Mode.FULL, _Mode.NONE, every=2)
    graphs.wrap_dummy_runs(_Runner)
    desc = _Desc((_Mode.FULL, 1))
    us = float(torch.rand(1, generator=torch.Generator().manual_seed(5))) * 20 + 1

    def create_forward_fn(d, warmup):
        def forward(mode):
            key = graphs.capture_key()
            if _Manager.capturing and key is not None:
                a, b = _FakeEvent(0.0), _FakeEvent(us)
                a.done = b.done = True
                key.add("l0", a, b)
        return forward

    manager = _Manager([desc])
    manager.capture(create_forward_fn)
    calls = profiling.calls
    _Runner().execute_model(desc, dummy_run=True)
    assert profiling.calls == calls  # warm-up is not activity
    steps = 7
    for _ in range(steps):
        _Runner().execute_model(desc)
    assert profiling.calls == calls + steps
    deadline = time.monotonic() + 10  # the flush thread writes within IDLE_S + TICK_S of going idle
    while time.monotonic() < deadline:
        if profiling.path.exists():
            full = [g for g in json.loads(profiling.path.read_text())["graphs"] if g["kind"] == "full"]
            if full and full[0]["replays"] == steps:
                break
        time.sleep(prof.TICK_S)
    else:
        raise AssertionError("the replays were not flushed after the worker went idle")
    assert full[0]["m"] == 1 and full[0]["probed_replays"] == steps // 2


def test_a_twin_due_again_before_its_last_replay_completed_waits_for_it(profiling):
    """The twin's events hold its latest replay: when it is due again and the GPU has not reached
    the marker behind the previous one, the read waits (counted as forced) rather than lose it."""
    markers, new_marker = _markers()
    g = graphs.TwinGraph(m=2, every=2, new_marker=new_marker)
    g.add("a", _FakeEvent(0.0), _FakeEvent(4.0))
    due = []
    for _ in range(6):  # the GPU never reaches a marker by itself
        g.poll(profiling)
        if g.twin_due():
            g.poll(profiling, wait=True)
            g.twin_replayed()
            due.append(g.replays)
        g.replays += 1
    assert due == [1, 3, 5] and g.probed == 3 and g.reads == 2 and g.forced == 2
    assert markers[0].waited and markers[1].waited and not markers[2].waited
    assert profiling.graph_stats[("a", 2)].samples_us == [4.0, 4.0]


@pytest.mark.gpu
def test_layers_timed_inside_a_captured_cuda_graph(profiling):
    """Capture three layers the way vLLM's CUDAGraphWrapper does (graphs.capture_key set), replay:
    the in-graph events give each layer's GPU time; eager calls outside graphs still time."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layers = _layers("cuda")
    m = 8
    x = torch.randn(m, 256, device="cuda")

    def model(x):
        for idx, _ in layers:
            x = runtime.run(x, idx)
        return x

    model(x)  # warm-up: Triton compiles outside the capture
    torch.cuda.synchronize()
    g = graphs.Graph(m, every=1)
    cg = torch.cuda.CUDAGraph()
    graphs._local.key = g
    try:
        with torch.cuda.graph(cg):
            y = model(x)
    finally:
        graphs._local.key = None
    assert len(g.pairs) == len(layers)
    profiling.graphs[("wrapper", m)] = g
    for _ in range(20):
        g.before_replay(profiling)
        cg.replay()
        g.after_replay(warmup=False)
    torch.cuda.synchronize()
    g.before_replay(profiling)  # reads the last replay
    _assert_chain(y, x, layers)
    profiling.flush(wait=True)
    comp = merge(load_workers(profiling.dir))
    graph = comp.backends[1]
    for r in graph.layers:
        v = r.latency_us[str(m)]
        assert v["count"] == 20 and v["replays_read"] >= 5 and 0 < v["median"] < 1e4


def test_supported_vllm_versions_and_one_line_refusal():
    from quantbridge.vllm import SUPPORTED_VLLM, unsupported

    for v in ("0.26.0", "0.29.1", "0.32.0", "0.32.0+cpu", "0.31.0rc1", "0.33.0", "0.33.2"):
        assert unsupported(v) is None, v
    for v in ("0.25.2", "0.34.0", "0.34.1", "1.0.0"):
        msg = unsupported(v)
        assert msg is not None and "\n" not in msg and SUPPORTED_VLLM in msg and v in msg


class _CudaManager:
    """A CudaGraphManager in miniature on a real GPU: static input and output buffers, one graph
    pool, FULL descriptors captured with torch.cuda.graph and replayed by descriptor."""

    def __init__(self, descs, forward):
        self._capture_descs = {_Mode.FULL: descs}
        self.graphs, self.pool, self.forward = {}, torch.cuda.graph_pool_handle(), forward

    def capture(self, create_forward_fn, progress_bar_desc="Capturing CUDA graphs"):
        for desc in self._capture_descs[_Mode.FULL]:
            create_forward_fn(desc, warmup=True)(_Mode.NONE)
            forward = create_forward_fn(desc, warmup=False)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool):
                forward(_Mode.NONE)
            self.graphs[desc] = graph

    def run_fullgraph(self, desc):
        self.graphs[desc].replay()


@pytest.mark.gpu
def test_probed_twins_of_real_cuda_graphs_give_the_same_output_and_layer_times(profiling, monkeypatch):
    """On a GPU: vLLM-style FULL graphs (static buffers, one pool) and their probed twins. Every step
    gives the float64 reference's output whichever graph replayed, the twin replays one step in
    EVERY, and each layer's in-graph GPU time is read from the twins."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    layers = _layers("cuda")
    m, every = 8, 4
    x_static = torch.empty(m, 256, device="cuda")
    y_static = torch.empty(m, 256, device="cuda")

    def model():
        h = x_static
        for idx, _ in layers:
            h = runtime.run(h, idx)
        y_static.copy_(h)

    x_static.copy_(torch.randn(m, 256, device="cuda"))
    model()  # compile the kernels outside any capture
    torch.cuda.synchronize()
    monkeypatch.setattr(_CudaManager, "capture", _CudaManager.capture)
    monkeypatch.setattr(_CudaManager, "run_fullgraph", _CudaManager.run_fullgraph)
    graphs.wrap_full_graphs(_CudaManager, _Mode.FULL, _Mode.NONE, every=every)
    desc = _Desc((_Mode.FULL, m))
    mgr = _CudaManager([desc], model)
    mgr.capture(lambda d, warmup: (lambda mode: model()))
    twin, twin_graph = mgr._quantbridge_twins[desc]
    assert len(twin.pairs) == len(layers) and twin_graph is not mgr.graphs[desc]
    gen = torch.Generator(device="cuda").manual_seed(3)
    for step in range(5 * every):
        x_static.copy_(torch.randn(m, 256, device="cuda", generator=gen))
        mgr.run_fullgraph(desc)
        _assert_chain(y_static, x_static, layers)  # synchronizes: the twin's marker completes
    assert twin.probed == 5 and twin.replays == 5 * every and twin.reads >= 4
    profiling.flush(wait=True)
    comp = merge(load_workers(profiling.dir))
    graph = comp.backends[1]
    for r in graph.layers:
        v = r.latency_us[str(m)]
        assert v["count"] == 5 * every and v["replays_read"] == twin.reads and 0 < v["median"] < 1e4

"""Per-layer GPU time inside vLLM's captured CUDA graphs.

A replay runs captured kernels without host code, so a layer's timers must be part of the
graph: while vLLM captures, each quantized layer records two CUDA events with
`external=True` around its kernel (quantbridge/vllm/runtime.py); they become event-record
nodes, re-recorded by every replay, and `elapsed_time` between them is the layer's GPU time
in the latest replay (the method of compare's graph mode, quantbridge/measure/probes.py
GraphLayerTimer).

vLLM captures and replays in `CUDAGraphWrapper.__call__` (vllm/compilation/cuda_graph.py;
the same in 0.26.0 and 0.32.0): the forward context's `cudagraph_runtime_mode` must equal
the wrapper's `runtime_mode`, and its `batch_descriptor` (num_tokens: the padded batch
size; num_reqs; uniform) picks the graph in `concrete_cudagraph_entries`; an entry whose
`cudagraph` is None is captured, else `entry.cudagraph.replay()`. `install` wraps that
method (only when profiling is on) so the profiler learns which graph is being captured
(key: the wrapper, the batch descriptor) and when each graph is replayed.

vLLM's second model runner (vllm/v1/worker/gpu/, the default on a GPU in 0.26.0 and 0.32.0)
captures and replays its FULL graphs (uniform decode batches: most served steps) itself, not
through CUDAGraphWrapper: `CudaGraphManager.capture(create_forward_fn)` calls each FULL
descriptor's forward function with CUDAGraphMode.NONE once outside and once inside
`torch.cuda.graph`, and `run_fullgraph(desc)` replays. `install` wraps both (once that runner's
module is loaded: the quantized layers are built after it) and the runner's `execute_model`, whose
`dummy_run` replays are vLLM's warm-up, counted apart. These graphs are timed through probed twins
replayed one step in EVERY (TwinGraph), so the probes' GPU cost falls on those steps only; the
piecewise graphs keep their probes on every replay (a twin piece would write its output elsewhere
than the next piece reads).

Reading is cheap and never races a replay: a graph's events are read only while no later
replay of that graph has been enqueued. After a replay, when a read is due (every
QUANTBRIDGE_PROFILE_GRAPH_EVERY-th replay of that graph, default 8), a plain marker event is
recorded behind it. At the graph's next replay, before it is enqueued: if the marker has
completed, the layers' events are read then (no wait); if not, the sample is dropped and
tried again after this replay. After FORCE_FACTOR × EVERY replays without a read the
next one waits for its marker, so every captured batch size in steady use gets samples even
where the host runs ahead of the GPU. Every replay is counted, read or not.
"""

from __future__ import annotations

import os
import sys
import threading

import torch

from quantbridge.vllm import profiler as prof

ENV_EVERY = "QUANTBRIDGE_PROFILE_GRAPH_EVERY"
ENV_TWIN_EVERY = "QUANTBRIDGE_PROFILE_FULL_EVERY"  # one step in this many replays a FULL graph's probed twin
FORCE_FACTOR = 4
_local = threading.local()  # .key: the graph being captured on this thread, or None; .dummy: a warm-up step


def capture_key():
    """The key of the graph vLLM is capturing on this thread (None outside a vLLM capture)."""
    return getattr(_local, "key", None)


def in_warmup() -> bool:
    """Whether this thread runs a capture's warm-up pass or a dummy (warm-up) step of vLLM's."""
    return getattr(_local, "key", None) is not None or getattr(_local, "dummy", False)


class Graph:
    """One captured graph's timing events, replay count and read state."""

    def __init__(self, m: int, every: int, new_marker=None, kind: str = "piecewise") -> None:
        self.m = m
        self.kind = kind  # "piecewise" (CUDAGraphWrapper) or "full" (the second model runner's own graphs)
        self._new_marker = new_marker or torch.cuda.Event
        self.every = max(1, every)
        self.pairs: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.replays = 0
        self.warmup_replays = 0
        self.last_read = 0  # replay count at the latest read
        self.marker: torch.cuda.Event | None = None
        self.marked_at = -1  # replay count the marker follows
        self.reads = self.forced = self.dropped = 0

    def add(self, name: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.pairs.append((name, start, end))

    def before_replay(self, p: prof.Profiler) -> None:
        if self.marker is None or self.marked_at != self.replays:
            return
        if not self.marker.query():
            if self.replays - self.last_read < FORCE_FACTOR * self.every:
                self.marker, self.dropped = None, self.dropped + 1
                return
            self.marker.synchronize()
            self.forced += 1
        self._read(p)
        self.last_read = self.replays

    def _read(self, p: prof.Profiler) -> None:
        """The layers' GPU times in the replay the marker follows, into the profiler."""
        p.add_graph_sample(self.m, [(name, a.elapsed_time(b) * 1e3) for name, a, b in self.pairs])
        self.marker, self.reads = None, self.reads + 1

    def after_replay(self, warmup: bool) -> None:
        if warmup:
            self.warmup_replays += 1
            return
        self.replays += 1
        if self.marker is None and self.replays - self.last_read >= self.every:
            self.marker = self._new_marker()
            self.marker.record()
            self.marked_at = self.replays

    def to_dict(self) -> dict:
        return {"m": self.m, "kind": self.kind, "layers": len(self.pairs), "replays": self.replays,
                "warmup_replays": self.warmup_replays, "reads": self.reads, "forced_reads": self.forced,
                "dropped_reads": self.dropped}


def install() -> bool:
    """Wrap vLLM's graph capture and replay when profiling is on (idempotent); whether it is wrapped.

    Called at plugin registration (CUDAGraphWrapper) and again when the quantized layers are
    built (the second model runner's manager, whose module is loaded by then)."""
    if not os.environ.get(prof.ENV_DIR):
        return False
    try:
        from vllm.compilation.cuda_graph import CUDAGraphWrapper
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return False
    every = int(os.environ.get(ENV_EVERY, "8"))
    _wrap_piecewise(CUDAGraphWrapper, CUDAGraphMode, get_forward_context, is_forward_context_available, every)
    manager = getattr(sys.modules.get("vllm.v1.worker.gpu.cudagraph_utils"), "CudaGraphManager", None)
    runner = getattr(sys.modules.get("vllm.v1.worker.gpu.model_runner"), "GPUModelRunner", None)
    if manager is not None and runner is not None:
        wrap_full_graphs(manager, CUDAGraphMode.FULL, CUDAGraphMode.NONE, int(os.environ.get(ENV_TWIN_EVERY, "32")))
        wrap_dummy_runs(runner)
    return True


def _wrap_piecewise(wrapper_cls, CUDAGraphMode, get_forward_context, is_forward_context_available,
                    every: int) -> None:
    original = wrapper_cls.__call__
    if getattr(original, "_quantbridge", False):
        return

    def __call__(self, *args, **kwargs):
        p = prof._PROFILER
        if p is None or not is_forward_context_available():
            return original(self, *args, **kwargs)
        fc = get_forward_context()
        mode, bd = fc.cudagraph_runtime_mode, fc.batch_descriptor
        if mode == CUDAGraphMode.NONE or mode != self.runtime_mode or bd is None:
            return original(self, *args, **kwargs)
        key = (id(self), bd)
        entry = self.concrete_cudagraph_entries.get(bd)
        if entry is None or entry.cudagraph is None:  # this call captures
            graph = Graph(int(bd.num_tokens), every)
            _local.key = graph
            try:
                out = original(self, *args, **kwargs)
            finally:
                _local.key = None
            p.graphs[key] = graph
            return out
        graph = p.graphs.get(key)
        if graph is None:  # captured before profiling began
            return original(self, *args, **kwargs)
        graph.before_replay(p)
        out = original(self, *args, **kwargs)
        warmup = fc.attn_metadata is None
        graph.after_replay(warmup)
        if not warmup:
            p.touch()
        return out

    __call__._quantbridge = True
    __call__.__wrapped__ = original
    wrapper_cls.__call__ = __call__


class TwinGraph(Graph):
    """A FULL graph captured twice: vLLM's own, with no timers, replays every step; its probed twin
    (the same descriptor captured again with the layers' event pairs) replaces it on one step in
    `every`. A probed layer costs several µs of GPU time in a step (compare's graph mode measured
    7-10 µs on an H100), more than a small layer itself, so probing every step would cost tokens/s
    in proportion; this way the cost is paid on 1/every of the steps. Both graphs read vLLM's static
    input buffers and write its static output buffer, and share its graph pool, so either can
    replay any step. A twin's events are read once its marker has completed, at the latest just
    before the twin replays again; no sample is dropped."""

    def __init__(self, m: int, every: int, new_marker=None) -> None:
        super().__init__(m, every, new_marker, kind="full")
        self.probed = 0  # steps the twin replayed

    def poll(self, p: prof.Profiler, wait: bool = False) -> None:
        """Read the twin's last replay if its marker has completed (or wait for it)."""
        if self.marker is None:
            return
        if not self.marker.query():
            if not wait:
                return
            self.marker.synchronize()
            self.forced += 1
        self._read(p)

    def twin_due(self) -> bool:
        return self.replays % self.every == self.every - 1

    def twin_replayed(self) -> None:
        self.probed += 1
        self.marker = self._new_marker()
        self.marker.record()

    def to_dict(self) -> dict:
        return {**super().to_dict(), "probed_replays": self.probed, "every": self.every}


def wrap_full_graphs(manager_cls, full, none, every: int) -> None:
    """Time the layers of the FULL graphs `manager_cls` (vLLM's CudaGraphManager) captures, through
    probed twins (TwinGraph).

    `capture` runs vLLM's capture as it is (the graphs vLLM replays get no timers), then once more
    for the FULL descriptors only, each forward function then carrying a TwinGraph as the capture
    key; the layers add their event pairs only while a stream is capturing (runtime.py), so the
    warm-up pass before each capture adds none. The second pass's graphs become the twins, and
    vLLM's own go back in place. `run_fullgraph` swaps a twin in for the steps it is due."""
    capture, replay = manager_cls.capture, manager_cls.run_fullgraph
    if getattr(capture, "_quantbridge", False):
        return

    def capture_wrapped(self, create_forward_fn, *args, **kwargs):
        p = prof._PROFILER
        before = getattr(_local, "dummy", False)
        _local.dummy = True  # a capture's eager warm-up passes are not served steps
        try:
            out = capture(self, create_forward_fn, *args, **kwargs)
            descs = getattr(self, "_capture_descs", None)
            if p is None or not isinstance(descs, dict) or full not in descs or not isinstance(self.graphs, dict):
                return out  # not the manager this was written against: its FULL graphs stay untimed
            probes: dict = {}

            def create(desc, *a, **kw):
                forward = create_forward_fn(desc, *a, **kw)

                def probed(cg_mode):
                    graph = probes.setdefault(desc, TwinGraph(int(desc.num_tokens), every))
                    _local.key = graph if cg_mode == none else None
                    try:
                        return forward(cg_mode)
                    finally:
                        _local.key = None
                return probed
            plain, self.graphs = self.graphs, {}
            self._capture_descs = {full: descs[full]}
            try:
                capture(self, create, *args, **kwargs)
                twins = self.graphs
            except Exception as e:  # noqa: BLE001 - the profiler must not stop the server: serve untimed
                twins = {}
                print(f"quantbridge: the probed twins of the FULL CUDA graphs could not be captured "
                      f"({type(e).__name__}: {e}); those graphs run untimed", file=sys.stderr, flush=True)
            finally:
                self.graphs, self._capture_descs = plain, descs
            # On the manager, not in the profiler: a manager vLLM drops (0.32 captures once on a
            # throwaway pool to size its memory) takes its twins and their memory with it.
            self._quantbridge_twins = {desc: (probes[desc], cuda_graph) for desc, cuda_graph in twins.items()
                                       if desc in probes and probes[desc].pairs and desc in plain}
            return out
        finally:
            _local.dummy = before

    def run_fullgraph(self, desc):
        p = prof._PROFILER
        entry = getattr(self, "_quantbridge_twins", {}).get(desc) if p is not None else None
        if entry is None:
            return replay(self, desc)
        graph, twin = entry
        if getattr(_local, "dummy", False):
            graph.warmup_replays += 1
            return replay(self, desc)
        p.graphs.setdefault(("full", id(graph)), graph)  # reported once it serves a step
        graph.poll(p)
        if graph.twin_due():
            graph.poll(p, wait=True)  # the twin's events are about to be overwritten
            plain = self.graphs[desc]
            self.graphs[desc] = twin
            try:
                out = replay(self, desc)
            finally:
                self.graphs[desc] = plain
            graph.twin_replayed()
        else:
            out = replay(self, desc)
        graph.replays += 1
        p.touch()
        return out

    for fn, orig in ((capture_wrapped, capture), (run_fullgraph, replay)):
        fn._quantbridge, fn.__wrapped__ = True, orig
    manager_cls.capture, manager_cls.run_fullgraph = capture_wrapped, run_fullgraph


def wrap_dummy_runs(runner_cls) -> None:
    """Mark the steps `runner_cls.execute_model(..., dummy_run=True)` runs: vLLM's warm-up."""
    original = runner_cls.execute_model
    if getattr(original, "_quantbridge", False):
        return

    def execute_model(self, *args, **kwargs):
        before = getattr(_local, "dummy", False)
        _local.dummy = bool(kwargs.get("dummy_run", args[2] if len(args) > 2 else False))
        try:
            return original(self, *args, **kwargs)
        finally:
            _local.dummy = before

    execute_model._quantbridge, execute_model.__wrapped__ = True, original
    runner_cls.execute_model = execute_model

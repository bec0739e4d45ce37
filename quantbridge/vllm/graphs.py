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
import threading

import torch

from quantbridge.vllm import profiler as prof

ENV_EVERY = "QUANTBRIDGE_PROFILE_GRAPH_EVERY"
FORCE_FACTOR = 4
_local = threading.local()  # .key: the graph being captured on this thread, or None


def capture_key():
    """The key of the graph vLLM is capturing on this thread (None outside a vLLM capture)."""
    return getattr(_local, "key", None)


class Graph:
    """One captured graph's timing events, replay count and read state."""

    def __init__(self, m: int, every: int, new_marker=None) -> None:
        self.m = m
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
        p.add_graph_sample(self.m, [(name, a.elapsed_time(b) * 1e3) for name, a, b in self.pairs])
        self.marker, self.last_read, self.reads = None, self.replays, self.reads + 1

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
        return {"m": self.m, "layers": len(self.pairs), "replays": self.replays, "warmup_replays": self.warmup_replays,
                "reads": self.reads, "forced_reads": self.forced, "dropped_reads": self.dropped}


def install() -> bool:
    """Wrap vLLM's CUDAGraphWrapper.__call__ when profiling is on (idempotent); whether it is wrapped."""
    if not os.environ.get(prof.ENV_DIR):
        return False
    try:
        from vllm.compilation.cuda_graph import CUDAGraphWrapper
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return False
    original = CUDAGraphWrapper.__call__
    if getattr(original, "_quantbridge", False):
        return True
    every = int(os.environ.get(ENV_EVERY, "8"))

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
        graph.after_replay(fc.attn_metadata is None)
        return out

    __call__._quantbridge = True
    __call__.__wrapped__ = original
    CUDAGraphWrapper.__call__ = __call__
    return True

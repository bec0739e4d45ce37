"""Per-layer timing inside a serving process, written to QUANTBRIDGE_PROFILE_DIR.

One Profiler per worker process. Each quantized linear call is timed and keyed by
(layer, M = tokens in the step). On CUDA the timers are event pairs recorded on the stream,
resolved later by the flush thread once they have completed (`Event.query()`), so serving
never waits on the host for a layer; on CPU the work is synchronous and `perf_counter_ns`
brackets it. Stats are cumulative; every flush rewrites this process's file atomically (a
temp file, then `os.replace`), so a reader always sees a whole file. Flushes happen every
QUANTBRIDGE_PROFILE_FLUSH_S seconds while busy (default 30), as soon as the worker goes idle
(no layer call or graph replay for IDLE_S), and at exit. A flush serializes every kept sample while holding
the GIL the serving thread needs: samples are kept as integer nanoseconds (a JSON integer
writes ~7x faster than a float; 1.2 M samples: 0.09 s against 0.60 s on the CI host,
benchmarks/profile_flush_cost.py), the busy period is
long, and each flush's own time is measured and written (`flush_ms`) so the cost is reported,
not guessed. The idle flush is what keeps every served step: `vllm serve`
SIGKILLs its workers on shutdown, so exit hooks never run there; a step is on disk within
about IDLE_S + TICK_S of the worker going idle, i.e. before a client that got its reply
can stop the server by hand. Steps vLLM runs without attention metadata (its
start-up profiling and warm-up passes) are counted apart as `warmup_calls`.
"""

from __future__ import annotations

import atexit
import collections
import json
import multiprocessing.util
import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEMA = 2  # 2: samples_ns (integer ns) and flush_ms; stats.py reads 1 (samples_us) too
ENV_DIR = "QUANTBRIDGE_PROFILE_DIR"
ENV_FLUSH = "QUANTBRIDGE_PROFILE_FLUSH_S"
RESERVOIR = 1024  # samples kept per (layer, M) for the median and percentiles
IDLE_S = 0.05  # no layer call or graph replay for this long: the worker is idle, flush now
TICK_S = 0.02


@dataclass
class _Acc:
    count: int = 0
    total_us: float = 0.0
    min_us: float = float("inf")
    max_us: float = 0.0
    samples_ns: list[int] = field(default_factory=list)

    def add(self, us: float, rng: random.Random) -> None:
        self.count += 1
        self.total_us += us
        self.min_us = min(self.min_us, us)
        self.max_us = max(self.max_us, us)
        ns = round(us * 1e3)
        # Reservoir sampling: a uniform sample of every call, however long the server runs.
        if len(self.samples_ns) < RESERVOIR:
            self.samples_ns.append(ns)
        else:
            j = rng.randrange(self.count)
            if j < RESERVOIR:
                self.samples_ns[j] = ns

    @property
    def samples_us(self) -> list[float]:
        return [v / 1e3 for v in self.samples_ns]

    def to_dict(self) -> dict:
        return {"count": self.count, "total_us": self.total_us, "min_us": self.min_us, "max_us": self.max_us,
                "samples_ns": list(self.samples_ns)}


class Profiler:
    def __init__(self, out_dir: str | Path, meta: dict | None = None, flush_s: float = 30.0) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta or {})
        self.layers: dict[str, dict] = {}  # name -> shape, kernel, weight bytes
        self.stats: dict[tuple[str, int], _Acc] = {}  # eager calls: device time (CUDA events; CPU: host clock)
        self.host: dict[tuple[str, int], _Acc] = {}  # eager calls on CUDA: host time of the call (enqueue cost)
        self.graph_stats: dict[tuple[str, int], _Acc] = {}  # inside captured graphs: GPU time per replay read
        self.graphs: dict = {}  # (CUDAGraphWrapper id, batch descriptor) -> graphs.Graph
        self.warmup: dict[str, int] = {}
        self.pending: collections.deque = collections.deque()  # (name, M, start, end) in stream order
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._stop = threading.Event()
        self._closed = False
        self.flushes = 0
        self.flush_ms = {"count": 0, "total": 0.0, "max": 0.0}  # the flushes' own time (earlier flushes)
        self.calls = 0  # layer calls and served graph replays seen; the flush thread compares it
        self._last_call = time.monotonic()
        self.path = self.dir / f"worker-{socket.gethostname()}-{os.getpid()}.json"
        self._thread = threading.Thread(target=self._loop, args=(flush_s,), daemon=True, name="quantbridge-profile")
        self._thread.start()
        atexit.register(self.close)
        # multiprocessing children may leave through os._exit, which skips atexit; its
        # finalizers still run on a normal exit from the process's target.
        multiprocessing.util.Finalize(self, self.close, exitpriority=100)

    def describe(self, name: str, **info) -> None:
        self.layers[name] = info

    # -- timing --------------------------------------------------------------------------------
    def start(self, x: torch.Tensor):
        if x.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev, time.perf_counter_ns()
        return time.perf_counter_ns()

    @staticmethod
    def graph_event() -> torch.cuda.Event:
        """An event recorded as a node of the graph being captured (re-recorded by every replay)."""
        ev = torch.cuda.Event(enable_timing=True, external=True)
        ev.record()
        return ev

    def add_graph_sample(self, m: int, layers: list[tuple[str, float]]) -> None:
        """One replay's per-layer GPU times (µs) of a graph captured at batch size `m`."""
        with self._lock:
            for name, us in layers:
                acc = self.graph_stats.get((name, m))
                if acc is None:
                    acc = self.graph_stats[(name, m)] = _Acc()
                acc.add(us, self._rng)

    def touch(self) -> None:
        """Activity for the idle flush: a layer call, or a served graph replay (a step that replays a
        captured graph calls no layer)."""
        self.calls += 1
        self._last_call = time.monotonic()

    def stop(self, token, name: str, m: int, warmup: bool) -> None:
        self.touch()
        if warmup:
            self.warmup[name] = self.warmup.get(name, 0) + 1
            return
        if isinstance(token, int):
            us = (time.perf_counter_ns() - token) / 1e3
            with self._lock:
                self._acc(name, m).add(us, self._rng)
            return
        start, t0 = token
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        host_us = (time.perf_counter_ns() - t0) / 1e3
        with self._lock:
            acc = self.host.get((name, m))
            if acc is None:
                acc = self.host[(name, m)] = _Acc()
            acc.add(host_us, self._rng)
        self.pending.append((name, m, start, end))  # deque append/popleft are thread-safe

    def _acc(self, name: str, m: int) -> _Acc:
        acc = self.stats.get((name, m))
        if acc is None:
            acc = self.stats[(name, m)] = _Acc()
        return acc

    def _resolve(self, wait: bool) -> None:
        """Move completed CUDA event pairs into the stats (all of them when `wait`)."""
        while self.pending:
            item = self.pending.popleft()
            name, m, start, end = item
            if wait:
                end.synchronize()
            elif not end.query():
                self.pending.appendleft(item)  # later events on the stream are not done either
                return
            with self._lock:
                self._acc(name, m).add(start.elapsed_time(end) * 1e3, self._rng)

    # -- output --------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            layers = {n: {**info, "m": {}} for n, info in self.layers.items()}
            for (name, m), acc in self.stats.items():
                layers.setdefault(name, {"m": {}})["m"][str(m)] = acc.to_dict()
            for (name, m), acc in self.host.items():
                layers.setdefault(name, {"m": {}}).setdefault("host_m", {})[str(m)] = acc.to_dict()
            replays: dict[tuple[str, int], int] = {}
            graphs = []
            for g in list(self.graphs.values()):
                graphs.append(g.to_dict())
                for name in {n for n, _, _ in g.pairs}:
                    replays[(name, g.m)] = replays.get((name, g.m), 0) + g.replays
            for (name, m), n in replays.items():
                slot = layers.setdefault(name, {"m": {}}).setdefault("graph_m", {})
                acc = self.graph_stats.get((name, m))
                slot[str(m)] = {**(acc.to_dict() if acc else _Acc().to_dict()), "replays": n}
            for slot in layers.values():  # JSON has no infinity: a slot with no sample read yet
                for acc in slot.get("graph_m", {}).values():
                    if acc["count"] == 0:
                        acc["min_us"] = 0.0
            return {"schema": SCHEMA, "pid": os.getpid(), "host": socket.gethostname(), **self.meta,
                    "updated": time.time(), "flushes": self.flushes + 1, "flush_ms": dict(self.flush_ms),
                    "warmup_calls": dict(self.warmup),
                    "graphs": graphs, "layers": layers}

    def flush(self, wait: bool = False) -> None:
        t0 = time.perf_counter()
        self._resolve(wait)
        data = self.snapshot()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        self.flushes += 1
        ms = (time.perf_counter() - t0) * 1e3
        self.flush_ms = {"count": self.flush_ms["count"] + 1, "total": self.flush_ms["total"] + ms,
                         "max": max(self.flush_ms["max"], ms)}

    def _loop(self, period: float) -> None:
        flushed_calls, flushed_at = 0, time.monotonic()
        while not self._stop.wait(TICK_S):
            now, calls = time.monotonic(), self.calls
            if calls == flushed_calls:
                continue
            if now - self._last_call < IDLE_S and now - flushed_at < period:
                continue
            try:
                self.flush()
                flushed_calls, flushed_at = calls, now
            except Exception:  # noqa: BLE001 - a failed periodic write must not stop serving
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.flush(wait=True)


_PROFILER: Profiler | None = None


def profiler(meta: dict | None = None) -> Profiler | None:
    """This process's profiler, created on first use when QUANTBRIDGE_PROFILE_DIR is set."""
    global _PROFILER
    if _PROFILER is None and os.environ.get(ENV_DIR):
        _PROFILER = Profiler(os.environ[ENV_DIR], meta, float(os.environ.get(ENV_FLUSH, "30")))
    return _PROFILER

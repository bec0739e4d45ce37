"""The CUDA-graph timer: a callable captured once on a static input, replayed per input, timed with CUDA events.

Serving engines run decode as replayed CUDA graphs, so a replay's time has no host launch
overhead in it. compare's graph mode (timing.py: the whole step, and the same step with probes)
and bench (one layer per shape) both time this way: before each replay the input is copied into
the graph's static buffer and L2 is flushed. compare's step is timed by CUDA events around the
replay; bench's layer by events captured inside the graph around the call, as compare's probes
time a layer in the step: events around a replay also hold the graph's launch latency (2.5 µs on
an H100, the same for every kernel: benchmarks/results/event-placement-H100-80GB-HBM3.txt), which
is a fifth of a small layer's time. bench reports that latency apart.

What cannot be captured (a host synchronisation, a call capture forbids) raises NotCapturable,
after the failed capture is undone; `time_replays` then times the call eagerly and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from quantbridge.measure.probes import L2Flush, time_calls

CUDA_GRAPH, EAGER = "cuda-graph", "eager"  # how time_replays timed (bench rows' `timing`)


class NotCapturable(Exception):
    """This mode cannot time this model (the message says why, in one line)."""


@dataclass(frozen=True)
class Bracketed:
    """A captured graph and the two events recorded inside it around the timed call."""

    graph: torch.cuda.CUDAGraph
    start: torch.cuda.Event
    stop: torch.cuda.Event


@dataclass
class Replays:
    """Per-input times of one call (µs) and how they were taken; `launch_us`: per replay, the
    replay's whole time less the call's (the graph launch), empty where timed eagerly."""

    samples: list[float]
    timing: str
    launch_us: list[float] = field(default_factory=list)


class GraphTimer:
    """CUDA graphs of calls on one static input buffer (a copy of `example`), replayed one at a time.

    `input_in_l2`: L2 is flushed before the input is copied in, so a replay finds its input in
    L2 as a model's step finds what the step before it wrote (compare); otherwise after, so the
    input comes from memory like the weights, as in an eager timed call (bench).
    """

    def __init__(self, example: torch.Tensor, device: torch.device, flush: L2Flush, *, input_in_l2: bool) -> None:
        self.static = example.clone()
        self.device, self.flush, self.input_in_l2 = device, flush, input_in_l2
        self._pool = None
        self._start, self._stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def warm_up(self, fn: Callable[[torch.Tensor], object]) -> None:
        """fn(static) once on a side stream, as torch.cuda.graphs asks before a capture (lazy workspaces)."""
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn(self.static)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[torch.Tensor], object]) -> torch.cuda.CUDAGraph:
        """fn(static) as a CUDA graph; raises NotCapturable. Graphs after the first share its memory
        pool: they are replayed one at a time on one stream."""
        g = _capture(lambda: fn(self.static), self._pool)
        if self._pool is None:
            self._pool = g.pool()
        return g

    def _load(self, x: torch.Tensor) -> None:
        """Before a replay: the next input into the static buffer (inputs rotate), L2 flushed."""
        if self.input_in_l2:
            self.flush()
            self.static.copy_(x)
        else:
            self.static.copy_(x)
            self.flush()

    def replay_us(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor) -> float:
        """µs of one replay on `x` between two CUDA events, waited for: events recorded inside the
        graph (probes) can be read as soon as it returns."""
        self._load(x)
        self._start.record()
        graph.replay()
        self._stop.record()
        self._stop.synchronize()
        return self._start.elapsed_time(self._stop) * 1e3

    def capture_bracketed(self, fn: Callable[[torch.Tensor], object]) -> Bracketed:
        """fn(static) as a CUDA graph with a timing event recorded inside it on each side of the call."""
        a, b = (torch.cuda.Event(enable_timing=True, external=True) for _ in range(2))

        def body(x: torch.Tensor) -> None:
            a.record()
            fn(x)
            b.record()

        return Bracketed(self.capture(body), a, b)

    def bracketed_us(self, run: Bracketed, xs: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
        """(µs between the events inside the graph, µs of the whole replay) per input. Each replay
        is waited for: the next one records the same events again."""
        inside, whole = [], []
        for x in xs:
            whole.append(self.replay_us(run.graph, x))
            inside.append(run.start.elapsed_time(run.stop) * 1e3)
        return inside, whole


def replay_times(fn: Callable[[], object], device: torch.device, runs: int, warmup: int = 3) -> list[float]:
    """µs of each of `runs` replays of fn() captured as a CUDA graph (no input: fixed work, such as the
    machine check's), after `warmup` untimed replays; CUDA events around each, read after the last."""
    fn()  # lazy workspaces (cuBLAS) before the capture
    torch.cuda.synchronize(device)
    graph = _capture(fn)
    for _ in range(warmup):
        graph.replay()
    return time_calls(lambda _: graph.replay(), range(runs), device)


def time_replays(fn: Callable[[torch.Tensor], object], xs: Sequence[torch.Tensor], device: torch.device,
                 flush: L2Flush) -> Replays:
    """µs of fn(x) for each x. On CUDA fn is captured once on a copy of xs[0] with events inside
    the graph around it, and replayed per input (CUDA_GRAPH): the times are the call's alone,
    the graph launch apart. On the CPU, or where fn cannot be captured, it is called eagerly
    (EAGER), L2 flushed before each call."""
    if device.type != "cuda":
        return Replays(time_calls(fn, xs, device, flush), EAGER)
    timer = GraphTimer(xs[0], device, flush, input_in_l2=False)
    try:
        run = timer.capture_bracketed(fn)
    except NotCapturable:  # undone and synchronised by _capture: time it eagerly and say so
        return Replays(time_calls(fn, xs, device, flush), EAGER)
    inside, whole = timer.bracketed_us(run, xs)
    return Replays(inside, CUDA_GRAPH, [w - i for w, i in zip(whole, inside)])


def _capture(fn: Callable[[], object], pool=None) -> torch.cuda.CUDAGraph:
    g = torch.cuda.CUDAGraph()
    try:
        # thread_local: the telemetry sampler's thread must not invalidate the capture.
        with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
            fn()
    except torch.cuda.OutOfMemoryError:
        raise  # out of memory is the row's failure, not a reason to time it another way
    except Exception as e:  # noqa: BLE001 - classified below
        if not is_capture_error(e):
            raise
        recover()
        raise NotCapturable(f"not capturable: {error_line(e)}") from e
    return g


def is_capture_error(e: BaseException) -> bool:
    """Errors that mean 'this work cannot be captured' (a host sync, an unsupported call), not a bug."""
    text = f"{type(e).__name__} {e}".lower()
    return "captur" in text or "graph" in text


def recover() -> None:
    """After a failed capture. It leaves torch's CUDA generator marked as capturing (its capture_end
    never ran), and every later random op fails: one empty capture that succeeds resets it."""
    try:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        scratch = torch.zeros(1, device=torch.cuda.current_device())
        with torch.cuda.graph(g):
            scratch.add_(1)
        del g
    except RuntimeError:
        pass


def error_line(e: BaseException) -> str:
    """'<Type>: <first line of the message>' (the type alone when there is no message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device, reused: kernels keep per-stream scratch buffers."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[index]

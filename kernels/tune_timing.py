"""How the tuner times one candidate: median milliseconds of a launch, L2 emptied before each.

Three ways (int4_settings.TUNE_TIMING picks one):
- "do_bench": triton.testing.do_bench. Its L2 flush zeroes a 256 MB buffer, so each timed launch
  starts with L2 full of dirty lines that are written back while the launch reads its weight.
- "read": launched as do_bench does (eagerly, CUDA events around each), but L2 is emptied by a read
  of a 256 MB buffer, as quantbridge's bench empties it: clean lines, nothing to write back. The
  buffer is that large so that reading it takes longer than the host needs to submit the launch:
  the start event never waits on the host.
- "graph": as the bench times a call. The launch is captured once in a CUDA graph with an event on
  each side of it inside the graph, and the graph is replayed after each read flush: no host cost
  and no launch latency in the figure, only the kernels.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

TIMINGS = ("do_bench", "read", "graph")
FLUSH_BYTES = 256 * 1024 * 1024  # do_bench's buffer size, over 5x an H100's 50 MB L2
MAX_RUNS = 500

_READ_BUFFERS: dict[int, torch.Tensor] = {}
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def check_timing(timing: str) -> None:
    """Raises ValueError naming the choices when `timing` is not one of them."""
    if timing not in TIMINGS:
        raise ValueError(f"unknown tuner timing {timing!r}: one of {', '.join(TIMINGS)}")


def release(device: torch.device) -> None:
    """Drops the flush buffer (256 MB) once a search is done: a serving process keeps no such thing."""
    _READ_BUFFERS.pop(device.index, None)


def _read_flush(device: torch.device) -> None:
    buf = _READ_BUFFERS.get(device.index)
    if buf is None:
        buf = _READ_BUFFERS[device.index] = torch.ones(FLUSH_BYTES // 4, device=device, dtype=torch.int32)
    buf.max()  # reads every line of the buffer once and writes one int


def time_ms(fn: Callable[[], object], device: torch.device, timing: str, warmup: int, rep_ms: float) -> float:
    """Median ms of fn() over about rep_ms of timed launches (5 to MAX_RUNS), L2 emptied before each."""
    check_timing(timing)
    if timing == "do_bench":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median")
    for _ in range(warmup):
        fn()
    timed = _eager if timing == "read" else _graph(fn, device)
    # As do_bench does: five launches estimate how many fill rep_ms.
    estimate = statistics.median(timed(fn, device, 5))
    return statistics.median(timed(fn, device, max(5, min(MAX_RUNS, int(rep_ms / max(estimate, 1e-3))))))


def _eager(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
    """ms of each of n launches of fn, L2 emptied by a read before each; CUDA events, read once all ran."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends):
        _read_flush(device)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _graph(fn: Callable[[], object], device: torch.device) -> Callable[[Callable[[], object], torch.device, int],
                                                                       list[float]]:
    """fn captured once, events inside the graph around it; returns the timer of n replays.

    Captured on the tuner's own stream, after one call on it outside the capture: what fn keeps per
    stream (the kernel's workspace) is then allocated once, as for any stream, not inside a graph's
    private pool. capture_begin/end, not torch.cuda.graph: that empties the allocator's cache on
    every entry, hundreds of times a tuning; thread-local errors leave other threads' work alone."""
    start, end = (torch.cuda.Event(enable_timing=True, external=True) for _ in range(2))
    side = _CAPTURE_STREAMS.get(device.index)
    if side is None:
        side = _CAPTURE_STREAMS[device.index] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            start.record()
            fn()
            end.record()
        finally:  # the capture ends, and the caller's stream is current again, whatever fn raised
            graph.capture_end()

    def replays(_fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
        times = []
        for _ in range(n):  # each replay waited for: the next one records the same two events
            _read_flush(device)
            graph.replay()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    return replays

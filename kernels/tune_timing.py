"""How the tuner times one candidate launch: median milliseconds, L2 emptied before each launch.

Two ways to empty L2 (int4_triton.TUNE_FLUSH picks one):
- "zero": triton.testing.do_bench's own. It zeroes a 256 MB buffer, so each timed launch starts
  with L2 full of dirty lines that are written back while the launch reads its weight.
- "read": as quantbridge's bench times a call. It reads a 256 MB buffer, so L2 holds clean lines
  and a timed launch's reads evict them without writes. The buffer is that large so that reading it
  takes longer than the host needs to submit the next launch: the launch's start event then never
  waits on the host.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

FLUSHES = ("zero", "read")
FLUSH_BYTES = 256 * 1024 * 1024  # do_bench's buffer size, over 5x an H100's 50 MB L2

_READ_BUFFERS: dict[int, torch.Tensor] = {}


def check_flush(flush: str) -> None:
    """Raises ValueError naming the choices when `flush` is not one of them."""
    if flush not in FLUSHES:
        raise ValueError(f"unknown tuner L2 flush {flush!r}: one of {', '.join(FLUSHES)}")


def _read_flush(device: torch.device) -> None:
    buf = _READ_BUFFERS.get(device.index)
    if buf is None:
        buf = _READ_BUFFERS[device.index] = torch.ones(FLUSH_BYTES // 4, device=device, dtype=torch.int32)
    buf.max()  # reads every line of the buffer once and writes one int


def time_ms(fn: Callable[[], object], device: torch.device, flush: str, warmup: int, rep_ms: float) -> float:
    """Median ms of fn() over about rep_ms of timed launches (5 to 500), each after `flush`."""
    check_flush(flush)
    if flush == "zero":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median")
    for _ in range(warmup):
        fn()
    # As do_bench does: five launches estimate how many fill rep_ms.
    estimate = _timed(fn, device, 5)
    n = max(5, min(500, int(rep_ms / max(statistics.median(estimate), 1e-3))))
    return statistics.median(_timed(fn, device, n))


def _timed(fn: Callable[[], object], device: torch.device, n: int) -> list[float]:
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

"""How fast the machine itself ran while each row was timed: fixed work, timed before and after.

Rows of one comparison are timed seconds to minutes apart. If something else used the machine
in between (another process on a shared CPU, a GPU that had not clocked up yet), a row looks
slower than it is. Every row therefore times the same fixed work just before and just after its
own timing; the spread of those times across the run is the drift that `recommend` holds latency
rankings against.

  CUDA  two fixed kernels, one bound by memory bandwidth (a copy of four times the L2 cache) and
        one by tensor-core throughput (a square matmul), each captured as a CUDA graph and timed
        with events around its replays: GPU time plus the graph's launch latency (2.5 µs on an H100,
        the same before and after a row, against works of tens of µs or more). The SM clock is brought up
        first (a GPU that idled sits at its lowest clock for the first milliseconds of work).
  CPU   one fixed matmul of about a millisecond, timed many times; the median, so a few
        interrupted runs do not move it, while a machine busy throughout does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantbridge.measure.graphs import replay_times
from quantbridge.measure.probes import time_calls

CLOCK_WARM_FRACTION = 0.9  # of the maximum SM clock NVML reports
CLOCK_WARM_MIN_S, CLOCK_WARM_MAX_S = 0.1, 1.0


@dataclass(frozen=True)
class FixedWork:
    name: str  # "memory" or "compute": what bounds it
    work: str  # what it is, for the results file
    run: Callable[[], object]


class _SmClock:
    """(current, maximum) SM clock in MHz through NVML; `read()` is None where NVML cannot say."""

    def __init__(self, device: torch.device) -> None:
        self._nvml = self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - no NVML (driver, container): warm up for the fixed time instead
            self.close()

    def read(self) -> tuple[int, int] | None:
        if self._handle is None:
            return None
        try:
            sm = self._nvml.NVML_CLOCK_SM
            return self._nvml.nvmlDeviceGetClockInfo(self._handle, sm), self._nvml.nvmlDeviceGetMaxClockInfo(self._handle, sm)
        except Exception:  # noqa: BLE001 - a query NVML refuses: as if it had no answer
            return None

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - nothing to release
                pass
        self._nvml = self._handle = None


def warm_clocks(device: torch.device) -> int | None:
    """Keep the GPU busy until its SM clock is near its maximum (or CLOCK_WARM_MAX_S passed).

    Returns the SM clock reached in MHz (None off CUDA or without NVML). The host clock only
    bounds how long the warm-up lasts; nothing is measured with it.
    """
    if device.type != "cuda":
        return None
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    clock = _SmClock(device)
    start = time.perf_counter()
    try:
        while True:
            for _ in range(8):
                a = torch.mm(a, a).clamp_(-1, 1)
            torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            now = clock.read()
            warm = now is None or now[0] >= CLOCK_WARM_FRACTION * now[1]
            if elapsed >= CLOCK_WARM_MAX_S or (elapsed >= CLOCK_WARM_MIN_S and warm):
                return None if now is None else now[0]
    finally:
        clock.close()


def _cuda_work(device: torch.device) -> list[FixedWork]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    n = 4 * l2 // 2  # bf16 elements: the copy reads and writes 4x the L2 each, so it runs from HBM
    src = torch.randn(n, generator=gen).to(device, torch.bfloat16)
    dst = torch.empty_like(src)
    k = 4096
    a = torch.randn(k, k, generator=gen).to(device, torch.bfloat16)
    b = torch.randn(k, k, generator=gen).to(device, torch.bfloat16)
    c = torch.empty(k, k, device=device, dtype=torch.bfloat16)
    return [FixedWork("memory", f"copy of {2 * n / 2**20:.0f} MiB (bf16), HBM-bound", lambda: dst.copy_(src)),
            FixedWork("compute", f"bf16 matmul {k}x{k} by {k}x{k}, tensor-core-bound",
                      lambda: torch.mm(a, b, out=c))]


def _time_graph(work: FixedWork, device: torch.device, runs: int) -> float:
    """Median GPU µs of one replay of `work` captured as a CUDA graph (events around each replay)."""
    return statistics.median(replay_times(work.run, device, runs))


def _cpu_time(device: torch.device, runs: int) -> float:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=gen)
    xs = [torch.randn(64, 1024, generator=gen) for _ in range(runs + 3)]
    with torch.inference_mode():
        samples = time_calls(lambda x: torch.nn.functional.linear(x, w), xs, device)
    return statistics.median(samples[3:])


CPU_WORK = "fp32 F.linear of [64, 1024] by [1024, 1024]"


def measure(device: torch.device, runs: int = 31) -> dict[str, dict]:
    """{name: {"work": what, "us": median µs}} for each fixed piece of work, on `device`."""
    if device.type != "cuda":
        return {"cpu": {"work": CPU_WORK, "us": _cpu_time(device, runs)}}
    with torch.cuda.device(device), torch.inference_mode():
        warm_clocks(device)
        out = {w.name: {"work": w.work, "us": _time_graph(w, device, runs)} for w in _cuda_work(device)}
    torch.cuda.empty_cache()  # its buffers must not stay reserved beside the next row's
    return out


def before_after(before: dict[str, dict], after: dict[str, dict], device: torch.device) -> dict:
    """The record a row keeps: each fixed work's median before and after the row, and how it was timed."""
    clock = ("GPU time: CUDA events around replays of a CUDA graph (the graph's launch latency included), "
             "SM clock warmed up first"
             if device.type == "cuda" else "host clock (perf_counter_ns), synchronous CPU work")
    return {"clock": clock,
            "work": {name: {"work": b["work"], "before_us": b["us"], "after_us": after[name]["us"]}
                     for name, b in before.items() if name in after}}

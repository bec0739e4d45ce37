"""Memory and device telemetry sampled while a backend runs.

Peak memory: the torch allocator's peak on CUDA (reset per backend); on CPU the process's
resident set, sampled (the kernel's own high-water mark is per process, not per backend).
With compare's rows in child processes (isolation "process") the process is the row's own,
so either figure is that row's alone.
GPU telemetry: SM/memory clocks, power and temperature through NVML, sampled on a thread,
summarised as min / median / max.
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

PERIOD_S = 0.1
T = TypeVar("T")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Sampler:
    """with Sampler(device) as s: ...; then s.summary() -> dict for model_metrics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._nvml = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._peak_outside = 0  # the allocator's peak before each outside_peak call

    def outside_peak(self, fn: Callable[[], T]) -> T:
        """Run `fn` (measuring aids: the machine check) without its allocations counting in this
        row's peak memory: the peak so far is kept, fn runs, and the allocator's peak restarts."""
        if self.device.type != "cuda":
            return fn()
        torch.cuda.synchronize(self.device)
        self._peak_outside = max(self._peak_outside, torch.cuda.max_memory_allocated(self.device))
        out = fn()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def __enter__(self) -> "Sampler":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_nvml()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._nvml is not None:
            import pynvml

            pynvml.nvmlShutdown()

    def _start_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._nvml = pynvml.nvmlDeviceGetHandleByIndex(idx)
        except Exception:  # noqa: BLE001 - no NVML (driver, container): telemetry is then absent
            self._nvml = None

    def _sample(self) -> dict:
        s = {"rss_bytes": _rss_bytes()}
        if self._nvml is not None:
            import pynvml

            h = self._nvml
            try:
                s.update(sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                         mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                         power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                         temperature_c=pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError:
                pass
        return s

    def _run(self) -> None:
        while True:
            self.samples.append(self._sample())
            if self._stop.wait(PERIOD_S):
                self.samples.append(self._sample())
                return

    def summary(self) -> dict:
        out: dict = {"samples": len(self.samples), "period_s": PERIOD_S}
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = max(self._peak_outside, torch.cuda.max_memory_allocated(self.device))
            out["memory_kind"] = "torch CUDA allocator peak"
        else:
            out["peak_memory_bytes"] = max((s["rss_bytes"] for s in self.samples), default=0)
            out["memory_kind"] = "process RSS peak (sampled)"
        for key in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c"):
            vals = [s[key] for s in self.samples if key in s]
            if vals:
                out[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        return out

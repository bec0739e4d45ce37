"""Per-layer probes: timing, captured activations and error, attached by module path.

Probes are forward hooks that exist only inside their `with` block, so a model without
active probes runs exactly as it would without quantbridge. Timing on CUDA records
pre-allocated events without synchronising (resolved after the run); on CPU it reads
perf_counter_ns, which is exact there because CPU work is synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from quantbridge.measure.metrics import ErrorStats, error_stats


class _Clock:
    """Marks points in time on one device; `elapsed_us(a, b)` is valid after `resolve()`."""

    def __init__(self, device: torch.device, capacity: int = 0) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list = []
        # Events are created up front so that creating one never sits between two marks.
        self._pool = [torch.cuda.Event(enable_timing=True) for _ in range(capacity)] if self.cuda else []

    def mark(self) -> int:
        if self.cuda:
            i = len(self._marks)
            ev = self._pool[i] if i < len(self._pool) else torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter_ns())
        return len(self._marks) - 1

    def resolve(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed_us(self, a: int, b: int) -> float:
        if self.cuda:
            return self._marks[a].elapsed_time(self._marks[b]) * 1e3
        return (self._marks[b] - self._marks[a]) / 1e3



class _Probes:
    """Pre- and post-forward hooks on every module (`_pre(name)`, `_post(name)`), only inside `with`."""

    modules: dict[str, nn.Module]

    def __enter__(self):
        self._handles = []
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self._handles.append(mod.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class LayerTimer(_Probes):
    """Times every call of the given modules. Use as a context manager around forward passes.

    Two clocks per call: the device clock (CUDA events without synchronising; on the CPU
    perf_counter_ns, exact there) and the host clock around the call alone, which is the
    host's cost of enqueueing the layer's work (`host_samples_us`). With `device_time=False`
    only the host clock runs, so the passes are not slowed by event records.
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device, calls_per_layer: int = 0,
                 device_time: bool = True) -> None:
        self.modules = modules
        self.device_time = device_time
        self.clock = _Clock(device, 2 * len(modules) * calls_per_layer if device_time else 0)
        self._pairs: dict[str, list[tuple[int, int]]] = {name: [] for name in modules}
        self._host: dict[str, list[float]] = {name: [] for name in modules}
        self._open: dict[str, tuple[int, int]] = {}

    def _pre(self, name: str) -> Callable:
        def hook(module, args):
            mark = self.clock.mark() if self.device_time else -1
            self._open[name] = (mark, time.perf_counter_ns())  # host clock last: it times the call alone

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, output):
            t1 = time.perf_counter_ns()
            a, t0 = self._open.pop(name)
            self._host[name].append((t1 - t0) / 1e3)
            if self.device_time:
                self._pairs[name].append((a, self.clock.mark()))

        return hook

    def samples_us(self) -> dict[str, list[float]]:
        """Per-layer call durations on the device clock, in µs (synchronises once, at the end)."""
        self.clock.resolve()
        return {n: [self.clock.elapsed_us(a, b) for a, b in pairs] for n, pairs in self._pairs.items()}

    def host_samples_us(self) -> dict[str, list[float]]:
        """Per-layer host time per call (enqueue cost on CUDA; the whole call on the CPU), in µs."""
        return self._host


class GraphLayerTimer(_Probes):
    """Timing events recorded inside a CUDA graph capture, around each module and the step.

    Use as a context manager around the capture, calling `begin()` and `end()` first and
    last inside it. The events are graph nodes (`external=True`), so every replay records
    them again; `read()` after a replay gives each layer's GPU time within that replay and
    the in-graph span from begin to end.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._pairs: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in modules}
        self._open: dict[str, torch.cuda.Event] = {}
        self._span: list[torch.cuda.Event] = []

    @staticmethod
    def _record() -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True, external=True)
        ev.record()
        return ev

    def begin(self) -> None:
        self._span = [self._record()]

    def end(self) -> None:
        self._span.append(self._record())

    def _pre(self, name: str) -> Callable:
        def hook(module, args):
            self._open[name] = self._record()

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, output):
            self._pairs[name].append((self._open.pop(name), self._record()))

        return hook

    def read(self) -> tuple[dict[str, float], float]:
        """({layer: µs in the last replay}, in-graph span µs); call after the replay finished."""
        layers = {n: sum(a.elapsed_time(b) for a, b in pairs) * 1e3 for n, pairs in self._pairs.items()}
        return layers, self._span[0].elapsed_time(self._span[1]) * 1e3


class L2Flush:
    """Evicts L2 between timed runs, so weights come from HBM, through a buffer of twice the L2 size.

    by="read" (the default) reads the buffer (one reduction), leaving clean lines, as in a model's
    step, where L2 holds the previous layers' weights. by="write" overwrites it: L2 is then full of
    dirty lines whose write-back the next kernel's reads pay for; on an H100 that made cuBLAS alone
    up to 19 % slower than the same call after a read (benchmarks/results/event-placement-*.txt)."""

    def __init__(self, device: torch.device, by: str = "read") -> None:
        if by not in ("write", "read"):
            raise ValueError(f"L2Flush(by={by!r}): 'write' or 'read'")
        self.buf, self.by = None, by
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
            self.buf = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
            self._sink = torch.empty((), dtype=torch.int64, device=device)

    @property
    def active(self) -> bool:
        return self.buf is not None

    @property
    def setting(self) -> str | None:
        """What results record as "l2_flush": "read" or "write", None where nothing is flushed."""
        return self.by if self.active else None

    def __call__(self) -> None:
        if self.buf is None:
            return
        if self.by == "read":
            torch.sum(self.buf, dim=0, dtype=torch.int64, out=self._sink)
        else:
            # No random numbers: after a failed graph capture the CUDA generator may refuse them.
            self.buf.add_(1)


def time_calls(fn: Callable[[torch.Tensor], object], inputs: Iterable[torch.Tensor], device: torch.device,
               between: Callable[[], None] | None = None) -> list[float]:
    """Duration in µs of fn(x) for each x, measured with the same clock the probes use."""
    inputs = list(inputs)
    clock = _Clock(device, 2 * len(inputs))
    pairs = []
    for x in inputs:
        if between is not None:
            between()
        a = clock.mark()
        fn(x)
        pairs.append((a, clock.mark()))
    clock.resolve()
    return [clock.elapsed_us(a, b) for a, b in pairs]


@contextmanager
def capture_io(modules: dict[str, nn.Module], store: torch.device | str = "cpu"):
    """Record each module's first input and its output (float32, on `store`) during the block.

    Yields a dict name -> (input, output), filled as the modules run.
    """
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(name: str):
        def hook(module, args, output):
            captured[name] = (args[0].detach().to(store, torch.float32), output.detach().to(store, torch.float32))

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def propagated_error(modules: dict[str, nn.Module], reference: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Compare each module's output in its own model's forward with the reference output.

    The error accumulates every upstream layer's error too: that is the point of 'propagated'.
    Yields a dict name -> ErrorStats, filled as the modules run.
    """
    out: dict[str, ErrorStats] = {}

    def make(name: str):
        def hook(module, args, output):
            ref = reference[name][1]
            out[name] = error_stats(output.detach().to(ref.device), ref)

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def isolated_error(module: nn.Module, ref_in: torch.Tensor, ref_out: torch.Tensor,
                   device: torch.device, dtype: torch.dtype) -> ErrorStats:
    """The layer fed the reference model's exact input: error that belongs to this layer alone."""
    y = module(ref_in.to(device, dtype))
    return error_stats(y.to(ref_out.device), ref_out)

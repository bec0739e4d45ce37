"""Timing one step shape (one M) of a model, in the row's timing mode.

  eager    plain forward passes; CUDA events (or perf_counter_ns on the CPU) around each
           linear, and the host clock around each call: the host's enqueue cost, apart.
  graph    the whole forward captured as a CUDA graph (graphs.py, as bench times a layer),
           timing events recorded inside the capture around each linear, so a layer's time is its GPU time within a replayed
           step: no host gaps, the L2 state its neighbours leave. A graph without probes
           gives the step time; the linears are probed in as many further graphs as keep
           each one's cost within PROBE_BUDGET of the step, measured against the plain one.
  compile  torch.compile(mode="reduce-overhead") with every linear an opaque op (as engines
           run their quantized kernels): whole-step time only.

A mode that cannot run a row (a kernel that synchronises with the host cannot be captured)
falls back to the next one, graph -> eager, compile -> graph, and the label says why.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantbridge.measure.graphs import GraphTimer, NotCapturable, error_line, is_capture_error, recover
from quantbridge.measure.probes import GraphLayerTimer, L2Flush, LayerTimer, time_calls


@dataclass
class Step:
    """One M: a model, how to call it on an input, and its inputs (warm-up first, then one per run)."""

    model: nn.Module
    call: Callable[[nn.Module, torch.Tensor], object]
    inputs: list[torch.Tensor]
    warmup: int
    layers: dict[str, nn.Module]  # the probed modules, by path
    device: torch.device
    flush: L2Flush

    def forward(self, x: torch.Tensor) -> object:
        return self.call(self.model, x)

    @property
    def timed(self) -> list[torch.Tensor]:
        return self.inputs[self.warmup:]


@dataclass
class StepTiming:
    mode: str
    label: str  # what the row's `timing` says: the mode, and why when it fell back
    layer_us: dict[str, list[float]]  # GPU time per layer per run (empty in compile mode)
    host_us: dict[str, list[float]]  # host time per layer call, eager passes
    step_us: list[float]  # the whole step, probes off
    step_probed_us: list[float]  # the whole step, probes on
    span_us: list[float] | None = None  # graph mode: in-graph time from the step's first to its last event
    # Graph mode: the linears are probed in several graphs (PROBE_BUDGET); each one's replay
    # times and how many layers it probed.
    probed_by_graph: list[list[float]] | None = None
    probed_layers_by_graph: list[int] | None = None


def eager(step: Step) -> StepTiming:
    for x in step.inputs[: step.warmup]:
        step.forward(x)
    off = time_calls(step.forward, step.timed, step.device, step.flush)
    with LayerTimer(step.layers, step.device, len(step.timed)) as timer:
        on = time_calls(step.forward, step.timed, step.device, step.flush)
    return StepTiming("eager", "eager", timer.samples_us(), timer.host_samples_us(), off, on)


def _host_only(step: Step) -> dict[str, list[float]]:
    """Host enqueue cost per layer call in eager passes over the timed inputs (no events)."""
    with LayerTimer(step.layers, step.device, device_time=False) as timer:
        for x in step.timed:
            step.forward(x)
    torch.cuda.synchronize(step.device)
    return timer.host_samples_us()


# The share of the unprobed step that the timing events of one probed graph may add. Every
# event record is a graph node of its own (about 1 µs each on an H100), so probing all of a
# decode step's linears in one graph would lengthen it by 10-20 %; the linears are therefore
# spread over as many probed graphs as keep each one within this share of the step.
PROBE_BUDGET = 0.02
_ESTIMATE_RUNS = 5


def probe_groups(names: list[str], step_us: float, per_layer_us: float, budget: float = PROBE_BUDGET) -> list[list[str]]:
    """Layers split into interleaved groups, each probed in a graph of its own, so that one
    graph's probes add at most `budget` of `step_us` at `per_layer_us` per probed layer."""
    if per_layer_us <= 0 or not names:
        return [list(names)] if names else []
    per_group = max(1, int(budget * step_us / per_layer_us))
    groups = -(-len(names) // per_group)
    return [names[j::groups] for j in range(groups)]


def graph(step: Step) -> StepTiming:
    for x in step.inputs[: max(step.warmup, 1)]:  # kernels compile and tune on first use, not in the capture
        step.forward(x)
    host = _host_only(step)
    # Each replay runs on the next real input, with L2 flushed first: the step's input is where
    # a real step finds it, the weights come from memory.
    timer = GraphTimer(step.inputs[0], step.device, step.flush, input_in_l2=True)
    timer.warm_up(step.forward)
    plain = timer.capture(step.forward)  # the probed graphs share its pool

    def probed_graph(names: list[str]) -> tuple[torch.cuda.CUDAGraph, GraphLayerTimer]:
        probes = GraphLayerTimer({n: step.layers[n] for n in names})

        def probed_step(x: torch.Tensor) -> None:
            probes.begin()
            step.forward(x)
            probes.end()

        with probes:
            return timer.capture(probed_step), probes

    # What one probed layer costs here: a graph probing every layer against the plain one.
    names = list(step.layers)
    every = probed_graph(names)
    estimate = step.timed[:_ESTIMATE_RUNS]
    t_plain = statistics.median(timer.replay_us(plain, x) for x in estimate)
    t_every = statistics.median(timer.replay_us(every[0], x) for x in estimate)
    groups = probe_groups(names, t_plain, (t_every - t_plain) / max(len(names), 1))
    graphs = [every] if len(groups) <= 1 else [probed_graph(g) for g in groups]
    del every

    # Round robin over the inputs: the plain step, then each probed graph, so that a change in the
    # machine's speed during the run moves all of them alike.
    off: list[float] = []
    by_graph: list[list[float]] = [[] for _ in graphs]
    span: list[float] = []
    layer_us: dict[str, list[float]] = {n: [] for n in step.layers}
    for x in step.timed:
        off.append(timer.replay_us(plain, x))
        for times, (g, probes) in zip(by_graph, graphs):
            times.append(timer.replay_us(g, x))
            per_layer, s = probes.read()
            span.append(s)
            for n, v in per_layer.items():
                layer_us[n].append(v)
    sizes = [len(p.modules) for _, p in graphs]
    del plain, graphs
    return StepTiming("graph", "graph", layer_us, host, off, [t for times in by_graph for t in times], span,
                      probed_by_graph=by_graph, probed_layers_by_graph=sizes)


def compile_step(step: Step) -> StepTiming:
    from quantbridge.measure.opaque import opaque_linears

    for x in step.inputs[: max(step.warmup, 1)]:
        step.forward(x)
    host = _host_only(step)
    reference = _logits(step.forward(step.timed[0]))
    try:
        torch._dynamo.reset()  # no compiled code or recorded graph carried over from another row
        with opaque_linears(step.model, step.layers):
            compiled = torch.compile(step.model, mode="reduce-overhead", dynamic=False, fullgraph=False)
            run = lambda x: step.call(compiled, x)  # noqa: E731
            for x in step.inputs[: max(step.warmup, 3)]:  # cudagraph trees: warm-up, record, then replay
                run(x)
            got = _logits(run(step.timed[0]))
            err = (torch.linalg.vector_norm((got - reference).double()) / torch.linalg.vector_norm(reference.double())).item()
            if not err < 1e-2:  # the compiled step must compute what the row's model computes
                raise NotCapturable(f"not compilable: the compiled step's output differs from eager (rel. error {err:.2g})")
            off = time_calls(run, step.timed, step.device, step.flush)
    except (NotCapturable, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - dynamo/inductor failures mean: this row cannot be compiled
        if not (type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or is_capture_error(e)):
            raise
        recover()
        raise NotCapturable(f"not compilable: {error_line(e)}") from e
    finally:
        torch._dynamo.reset()
    # No probes run inside the compiled step, so there is no probed step time.
    return StepTiming("compile", "compile (reduce-overhead; whole step only)", {}, host, off, [])


def _logits(out: object) -> torch.Tensor:
    return getattr(out, "logits", out).float().clone()


TIMERS: dict[str, Callable[[Step], StepTiming]] = {"eager": eager, "graph": graph, "compile": compile_step}
FALLBACK = {"compile": "graph", "graph": "eager"}


def time_step(mode: str, step: Step) -> StepTiming:
    """Time `step` in `mode`, falling back (compile -> graph -> eager) where a mode cannot run it."""
    why: list[str] = []
    with torch.cuda.device(step.device) if step.device.type == "cuda" else contextlib.nullcontext():
        while True:
            try:
                timing = TIMERS[mode](step)
                break
            except NotCapturable as e:
                if mode not in FALLBACK:
                    raise
                why.append(str(e))
                mode = FALLBACK[mode]
    timing.label = describe(timing.label, why, step.device.type)
    return timing


def describe(label: str, why: list[str], device_type: str) -> str:
    """The row's `timing`: the mode that ran, and why the ones asked for first could not."""
    if device_type != "cuda":
        return "eager (CPU, synchronous)"
    return f"{label} ({'; '.join(why)})" if why else label

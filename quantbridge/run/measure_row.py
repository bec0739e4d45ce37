"""Measuring one row: errors against the reference, per-layer timing per M, whole-model metrics.

Every input comes in as an argument: the row's model (its linears swapped in), the
reference outputs and inputs, the timed steps and the timing mode. Nothing is read from
state an earlier step left behind.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch
from torch import nn

from quantbridge.measure import machinecheck
from quantbridge.measure.metrics import summarize
from quantbridge.measure.probes import L2Flush, isolated_error, propagated_error
from quantbridge.measure.timing import PROBE_BUDGET, Step, StepTiming, time_step
from quantbridge.results.schema import BackendResult, LayerRecord
from quantbridge.run.reference import Reference
from quantbridge.run.rows import Progress
from quantbridge.run.settings import Steps


def _call(model: nn.Module, x: torch.Tensor) -> object:
    return model(input_ids=x, use_cache=False)


def kernels_label(qlins: dict[str, nn.Module], targets: set[str]) -> str:
    return "+".join(sorted({qlins[n].kernel for n in targets}))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double())).item()


def time_row(qmodel: nn.Module, qlins: dict[str, nn.Module], ref: Reference, warmup: int, mode: str,
             device: torch.device, flush: L2Flush, progress: Progress, label: str = "") -> dict[int, StepTiming]:
    progress.begin(f"{label}: timing ({mode})", len(ref.steps))
    out = {}
    for m, inputs in ref.steps.items():
        out[m] = time_step(mode, Step(qmodel, _call, inputs, warmup, qlins, device, flush))
        progress.advance()
    return out


def timing_metrics(timings: dict[int, StepTiming], steps: Steps) -> dict:
    """Whole-step figures per M: step time, probes' cost, tokens/s, the time outside the linears."""
    metrics: dict = {"forward_us": {}, "forward_probed_us": {}, "probe_overhead_pct": {}, "tokens_per_s": {},
                     "linear_sum_us": {}, "step_remainder_us": {}, "timing": {}}
    for m, t in timings.items():
        key = str(m)
        off = summarize(t.step_us)
        metrics["forward_us"][key] = off.to_dict()
        if t.step_probed_us:  # compile mode has no probes inside its step
            on = summarize(t.step_probed_us)
            metrics["forward_probed_us"][key] = on.to_dict()
            # Graph mode probes the linears in several graphs: the overhead is the costliest one's.
            worst = on
            if t.probed_by_graph:
                worst = max((summarize(g) for g in t.probed_by_graph), key=lambda x: x.median)
                metrics.setdefault("probe_graphs", {})[key] = len(t.probed_by_graph)
                metrics["probe_budget_pct"] = 100 * PROBE_BUDGET
                # Each graph's extra time over the plain step, per layer it probed; the median graph.
                metrics.setdefault("probe_cost_per_layer_us", {})[key] = statistics.median(
                    (summarize(g).median - off.median) / n for g, n in zip(t.probed_by_graph, t.probed_layers_by_graph))
            metrics["probe_overhead_pct"][key] = 100 * (worst.median - off.median) / off.median
            # Its spread: the probed runs' p10..p90 against the unprobed ones' p90..p10. A range
            # that holds 0 means the probes' cost is inside the step's own run-to-run noise.
            metrics.setdefault("probe_overhead_range_pct", {})[key] = [
                100 * (worst.p10 - off.p90) / off.median, 100 * (worst.p90 - off.p10) / off.median]
        metrics["tokens_per_s"][key] = m * 1e6 / off.median
        metrics["timing"][key] = t.label
        if t.layer_us:
            # Per run, then the median: the linears' share and the rest of the same replays.
            runs = min(len(v) for v in t.layer_us.values())
            sums = [sum(v[i] for v in t.layer_us.values()) for i in range(runs)]
            metrics["linear_sum_us"][key] = summarize(sums).to_dict()
            if t.span_us is not None:
                # The rest of the step: the unprobed step minus the linears (the probed graphs'
                # spans are longer by the probes' cost, kept apart).
                metrics["step_remainder_us"][key] = off.median - metrics["linear_sum_us"][key]["median"]
                metrics.setdefault("in_graph_span_us", {})[key] = summarize(t.span_us).to_dict()
    decode = sorted(set(steps.batches))
    metrics["decode_tokens_per_s"] = {str(m): metrics["tokens_per_s"][str(m)] for m in decode}
    if steps.prefill and str(steps.prefill) in metrics["forward_us"]:
        metrics["prefill_latency_us"] = metrics["forward_us"][str(steps.prefill)]["median"]
    return metrics


def row_timing_label(timings: dict[int, StepTiming]) -> str:
    labels = list(dict.fromkeys(t.label for t in timings.values()))
    if len(labels) == 1:
        return labels[0]
    return "; ".join(f"{lab} (M={','.join(str(m) for m, t in timings.items() if t.label == lab)})" for lab in labels)


@torch.inference_mode()
def measure_row(name: str, qmodel: nn.Module, targets: set[str], quantized: set[str], ref: Reference,
                steps: Steps, mode: str, device: torch.device, dtype: torch.dtype, flush: L2Flush,
                progress: Progress | None = None,
                machine_check: Callable[[], dict] | None = None) -> BackendResult:
    """One row, from its model with its layers swapped in. `quantized` are the layers it quantizes.

    `machine_check` times the fixed work of machinecheck.measure (before and after the timing)."""
    progress = progress or Progress()
    qlins = {n: qmodel.get_submodule(n) for n in ref.io}
    progress.begin(f"{name}: error", len(qlins))
    with propagated_error(qlins, ref.io) as prop:
        out = qmodel(input_ids=ref.eval_ids, labels=ref.eval_ids, use_cache=False)
    iso = {}
    for n, mod in qlins.items():
        iso[n] = isolated_error(mod, *ref.io[n], device, dtype)
        progress.advance()
    bad = [n for n in qlins if math.isnan(iso[n].rel_l2) or math.isnan(prop[n].rel_l2)]
    if bad:
        return BackendResult(name=name, status="failed", reason=f"non-finite output in layer {bad[0]}",
                             kernel=kernels_label(qlins, targets))

    # The same fixed work timed just before and after this row's timing, in every row: how fast
    # the machine itself ran meanwhile (its spread across rows is the drift recommend holds
    # latency rankings against; see machinecheck).
    before = machine_check() if machine_check else None
    timings = time_row(qmodel, qlins, ref, steps.warmup, mode, device, flush, progress, name)
    metrics = timing_metrics(timings, steps)
    if before is not None:
        metrics["machine_check"] = machinecheck.before_after(before, machine_check(), device)
    metrics["eval_loss"] = out.loss.item()
    metrics["eval_ppl"] = math.exp(out.loss.item())
    metrics["eval_ppl_reference"] = math.exp(ref.loss)
    metrics["logits_rel_error"] = rel_error(out.logits.float().cpu(), ref.logits)
    # What the kernel chooser passed over for this row's layers, and why (kernel -> reason).
    passed_over = {k: why for mod in qlins.values() for k, why in getattr(mod, "rejected_kernels", ())}
    if passed_over:
        metrics["kernels_passed_over"] = passed_over
    layers = [
        LayerRecord(
            name=n,
            shape=[mod.out_features, mod.in_features],
            quantized=n in quantized,
            kernel=mod.kernel,
            weight_bytes=mod.weight_nbytes,
            latency_us={str(m): summarize(t.layer_us[n]).to_dict() for m, t in timings.items() if t.layer_us},
            host_us={str(m): summarize(t.host_us[n]).to_dict() for m, t in timings.items() if t.host_us.get(n)},
            error={"rel_isolated": iso[n].rel_l2, "rel_propagated": prop[n].rel_l2,
                   "sqnr_db": iso[n].sqnr_db, "cosine": iso[n].cosine},
        )
        for n, mod in qlins.items()
    ]
    counted = [r for r in layers if r.quantized] or [r for r in layers if r.name in targets]
    params = sum(r.shape[0] * r.shape[1] for r in counted)
    return BackendResult(
        name=name, status="ok", kernel=kernels_label(qlins, targets), timing=row_timing_label(timings),
        weight_bytes=sum(r.weight_bytes for r in layers),
        bits_per_weight=8 * sum(r.weight_bytes for r in counted) / params,
        layers=layers, model_metrics=metrics,
    )


@torch.inference_mode()
def sensitivity(model: nn.Module, qlins: dict[str, nn.Module], targets: list[str], eval_ids: torch.Tensor,
                ref_loss: float, progress: Progress | None = None) -> dict[str, float]:
    """Eval loss increase with only one layer swapped into the reference model, per layer."""
    progress = progress or Progress()
    out = {}
    progress.begin("sensitivity", len(targets))
    for n in targets:
        original = model.get_submodule(n)
        model.set_submodule(n, qlins[n])
        try:
            loss = model(input_ids=eval_ids, labels=eval_ids, use_cache=False).loss.item()
        finally:
            model.set_submodule(n, original)
        out[n] = loss - ref_loss
        progress.advance()
    return out

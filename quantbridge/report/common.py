"""Pieces both report renderers (terminal, HTML/Markdown) share: labels, step and plan rows."""

from __future__ import annotations

import statistics

from quantbridge.results.drift import slowdown
from quantbridge.results.plan import predict
from quantbridge.results.recommend import layer_latency_sum
from quantbridge.results.schema import Comparison

STEP_HEAD = ["backend", "M", "timing", "step µs", "Σ linears µs", "rest of step µs", "tokens/s",
             "host µs per layer call"]


def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def spec_label(spec: dict, auto: bool = False) -> str:
    g = spec.get("group_size")
    group = ("per-channel" if g == -1 else f"g{g}") + (" (auto: the largest of 128/64/32 dividing every layer)"
                                                         if auto else "")
    return f"INT{spec.get('bits')} {group} {'sym' if spec.get('symmetric') else 'asym'}"


def probe_overhead_label(mm: dict, m: str) -> str:
    """The probes' cost at one M as its range (p10..p90 of probed vs unprobed steps), not a point:
    "≈0 (−3.1…+4.0%)" when the range holds zero, else "+1.4% (+0.8…+2.1%)"."""
    point = mm.get("probe_overhead_pct", {}).get(m)
    rng = mm.get("probe_overhead_range_pct", {}).get(m)
    if point is None:
        return "—"
    if not rng:  # results written before the range was recorded
        return f"{point:+.1f}%"
    lo, hi = rng
    if lo <= 0 <= hi:
        return f"≈0 ({lo:+.1f}…{hi:+.1f}%)"
    return f"{point:+.1f}% ({lo:+.1f}…{hi:+.1f}%)"


def probe_note(comp: Comparison) -> str:
    """How the probes' cost was measured, and what one probed layer costs (graph mode)."""
    note = "probe overhead per M = the whole step with probes on vs off (p10…p90 range)"
    costs = [c for b in comp.backends if b.status == "ok"
             for c in (b.model_metrics.get("probe_cost_per_layer_us") or {}).values()]
    graphs = [g for b in comp.backends if b.status == "ok" for g in (b.model_metrics.get("probe_graphs") or {}).values()]
    budget = max((b.model_metrics.get("probe_budget_pct", 0) for b in comp.backends if b.status == "ok"), default=0)
    if costs and graphs:
        span = f"{min(graphs)}" if min(graphs) == max(graphs) else f"{min(graphs)}–{max(graphs)}"
        note += (f"; in graph mode the linears are probed in {span} graph(s), as many as keep each one's probes "
                 f"within {budget:.0f} % of the step, and the figure is the costliest graph's; one probed layer costs "
                 f"{statistics.median(costs):.2f} µs (median over rows and M: a probed graph's extra time over the "
                 f"plain step, per layer it probes)")
    return note


# A drift below this is a steady machine; above it the note says, in words, that other work
# slowed the machine and that latency rankings between rows are unreliable.
STEADY = 0.10


def drift_note(drift: float) -> str:
    """The machine check across rows (results.drift.drift) in words a person acts on."""
    if drift < STEADY:
        return (f"the machine ran at a steady speed: fixed work timed before and after every row stayed "
                f"within {drift:.0%}")
    return (f"other work slowed this machine by up to {slowdown(drift)} while the rows were timed (fixed work "
            f"timed before and after every row); latency rankings between rows closer than that are not "
            f"reliable: rerun on an idle machine")


TIMING_NOTES = {
    "graph": "per-layer GPU time from timing events inside a CUDA graph of each whole step",
    "eager": "per-layer time inside plain forward passes",
    "compile": "whole-step time of torch.compile(reduce-overhead); per-layer times need --mode graph",
}


def flush_note(setting: object) -> str:
    """A result's "l2_flush" in words. Results before 2026-12-06 record True: their flush wrote."""
    how = {"read": " by reads", "write": " by writes", True: " by writes"}.get(setting)
    return f"L2 flushed between runs{how}" if how else "L2 not flushed"


def timing_note(s: dict) -> str:
    """How latency was taken, in one clause (results of schema v1 have no mode: eager)."""
    mode = s.get("mode", "eager")
    clock = "CUDA events" if s.get("l2_flush") else "perf_counter_ns"
    flush = f", {flush_note(s['l2_flush'])}" if s.get("l2_flush") else ""
    return (f"latency: median of {s.get('runs')} runs after {s.get('warmup')} warm-up, "
            f"{TIMING_NOTES.get(mode, mode)} ({clock}{flush}); host µs = host time per eager layer call")


def step_rows(comp: Comparison) -> list[list[str]]:
    """Per row and M: the whole step, the linears' share, the rest, tokens/s, host cost per call."""
    rows = []
    for b in comp.backends:
        if b.status != "ok":
            continue
        mm = b.model_metrics
        for m, step in mm.get("forward_us", {}).items():
            rest = mm.get("step_remainder_us", {}).get(m)
            rest = rest.get("median") if isinstance(rest, dict) else rest  # a summary in older files
            host = [r.host_us[m]["median"] for r in b.layers if m in r.host_us]
            rows.append([b.name, m, mm.get("timing", {}).get(m, b.timing or ""), _fmt(step["median"], ".1f"),
                         _fmt(layer_latency_sum(b, m), ".1f"), _fmt(rest, ".1f"),
                         _fmt(mm.get("tokens_per_s", {}).get(m), ".1f"),
                         _fmt(statistics.median(host) if host else None, ".1f")])
    return rows


def plan_rows(comp: Comparison) -> list[list[str]]:
    """Predicted vs measured for a plan row, if the comparison ran one."""
    b = comp.plan_row()
    if b is None or b.status != "ok" or "plan" not in b.model_metrics:
        return []
    return [[k, _fmt(p), _fmt(m), _fmt(None if not p or m is None else 100 * (m / p - 1), "+.2f") + " %"]
            for k, (p, m) in plan_check(comp).items()]


def plan_check(comp: Comparison) -> dict[str, tuple[float, float | None]]:
    """(predicted, measured) per planned quantity. Latency is compared as a ratio to fp16 in
    the same run, since absolute timings move between runs; it is predicted twice: from the
    run the plan was made from, and from this run's own per-backend rows (which isolates the
    additive model from run-to-run drift of the timings)."""

    b, ref = comp.plan_row(), comp.reference()
    plan = b.model_metrics["plan"]
    pred = plan["predicted"]
    m = str(pred["m"])
    mine, base = layer_latency_sum(b, m), layer_latency_sum(ref, m) if ref and ref.status == "ok" else None
    measured_ratio = mine / base if mine and base else None
    out = {"weight_bytes": (pred["weight_bytes"], b.weight_bytes),
           "latency_ratio": (pred["latency_ratio"], measured_ratio)}
    ok = {x.name for x in comp.backends if x.status == "ok"}
    if set(plan["layers"].values()) <= ok:
        out["latency_ratio (this run's rows)"] = (predict(comp, plan["layers"], m)["latency_ratio"], measured_ratio)
    out["eval_ppl"] = (pred["eval_ppl"], b.model_metrics.get("eval_ppl"))
    return out



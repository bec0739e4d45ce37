"""Which backend to pick, computed from a comparison's numbers (never from a fixed table)."""

from __future__ import annotations

import statistics

from quantbridge.results import drift as machine_drift
from quantbridge.results.schema import BackendResult, Comparison


def layer_latency_sum(b: BackendResult, m: str) -> float | None:
    vals = [r.latency_us.get(m, {}).get("median") for r in b.layers]
    return sum(vals) if vals and None not in vals else None


def median_isolated_error(b: BackendResult) -> float | None:
    errs = [r.error.get("rel_isolated") for r in b.layers if r.quantized and r.error.get("rel_isolated") is not None]
    return statistics.median(errs) if errs else None


def _pick(candidates: list[tuple[float, str]]) -> tuple[str, float, tuple[str, float] | None] | None:
    if not candidates:
        return None
    ranked = sorted(candidates)
    runner = (ranked[1][1], ranked[1][0]) if len(ranked) > 1 else None
    return ranked[0][1], ranked[0][0], runner


def timing_drift(comp: Comparison) -> float | None:
    """How much the machine's own speed moved between the rows' timings (results.drift.drift of
    the fixed work every row timed before and after; None where fewer than two rows recorded it)."""
    return machine_drift.drift([rec for b in comp.backends if b.status == "ok"
                               for rec in [b.model_metrics.get("machine_check") or b.model_metrics.get("machine_probe_us")]
                               if isinstance(rec, dict)])


def recommendations(comp: Comparison) -> list[dict]:
    """One entry per question: the backend, the deciding figure, and the runner-up. A latency
    question whose winner leads its runner-up by less than the timing drift between rows is
    marked undecided (`within_drift`): that difference may be the machine, not the kernel."""
    ok = [b for b in comp.backends if b.status == "ok" and b.role != "plan"]
    quant = [b for b in ok if any(r.quantized for r in b.layers)]
    ref = comp.reference()
    decode = [str(m) for m in comp.settings.get("decode_m", [])]
    all_m = [str(m) for m in comp.settings.get("m_values", [])]
    out = []

    drift = timing_drift(comp)

    def add(question: str, metric: str, unit: str, cands: list[tuple[float, str]], base: float | None,
            timed: bool = False) -> None:
        pick = _pick(cands)
        if pick is None:
            return
        name, value, runner = pick
        rel = f" ({value / base:.2f}× {ref.name})" if base and ref else ""
        entry = {"question": question, "backend": name, "metric": metric, "value": value, "unit": unit,
                 "figure": f"{metric} {value:.4g} {unit}{rel}",
                 "runner_up": None if runner is None else {"backend": runner[0], "value": runner[1]}}
        if timed and drift is not None and runner is not None and value > 0 and runner[1] / value - 1 < drift:
            entry["within_drift"] = True
            entry["figure"] += (f"; undecided: {runner[1] / value - 1:.0%} ahead of {runner[0]}, but the machine's "
                                f"own speed moved by {machine_drift.slowdown(drift)} between rows")
        out.append(entry)

    if decode:
        m = decode[0]
        add(f"batch-{m} decode", f"Σ linear latency at M={m}", "µs",
            [(v, b.name) for b in ok if (v := layer_latency_sum(b, m)) is not None],
            layer_latency_sum(ref, m) if ref else None, timed=True)
    if all_m:
        m = all_m[-1]
        add(f"large-batch prefill (M={m})", f"Σ linear latency at M={m}", "µs",
            [(v, b.name) for b in ok if (v := layer_latency_sum(b, m)) is not None],
            layer_latency_sum(ref, m) if ref else None, timed=True)
    add("lowest error", "median isolated relative error", "",
        [(v, b.name) for b in quant if (v := median_isolated_error(b)) is not None], None)
    add("least weight memory", "weight bytes", "B", [(b.weight_bytes, b.name) for b in quant],
        ref.weight_bytes if ref else None)
    # Peak memory decides only where it is per backend: the CUDA allocator's peak is reset for
    # each row, while a CPU process's resident set carries every earlier row's allocations.
    peaks = [(b.model_metrics["peak_memory_bytes"], b.name) for b in quant
             if b.model_metrics.get("telemetry", {}).get("memory_kind", "").startswith("torch CUDA")]
    if peaks:
        add("least peak memory on this device", "torch CUDA allocator peak", "B", peaks,
            ref.model_metrics.get("peak_memory_bytes") if ref else None)
    return out


EPS = {"float32": 1.19e-7, "float16": 9.77e-4, "bfloat16": 7.81e-3}  # machine epsilon per compute dtype


def rounding_floor(comp: Comparison) -> float:
    """A relative error at or below this is the compute dtype's own rounding (its machine epsilon)."""
    return EPS.get(str(comp.settings.get("dtype", "float32")), EPS["float32"])


def sensitive_layers(comp: Comparison, top: int = 5) -> list[tuple[str, float, str, str]]:
    """The layers with the largest error across quantized backends:
    (layer, median over backends, measure, the backend where it is worst). A relative error at
    rounding level (`rounding_floor`) or a loss increase of 0 or less is not listed: an empty
    list means no layer stands out."""
    key = "loss_delta" if any("loss_delta" in r.error for b in comp.backends for r in b.layers) else "rel_isolated"
    per_layer: dict[str, list[tuple[float, str]]] = {}
    for b in comp.backends:
        if b.status != "ok" or b.role == "plan":
            continue
        for r in b.layers:
            if r.quantized and r.error.get(key) is not None:
                per_layer.setdefault(r.name, []).append((r.error[key], b.name))
    floor = rounding_floor(comp) if key == "rel_isolated" else 0.0  # a loss increase must be positive
    ranked = sorted(((statistics.median(v for v, _ in vals), n) for n, vals in per_layer.items()), reverse=True)
    return [(n, v, key, max(per_layer[n])[1]) for v, n in ranked[:top] if v > floor]

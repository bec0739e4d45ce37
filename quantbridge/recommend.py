"""Which backend to pick, computed from a comparison's numbers (never from a fixed table)."""

from __future__ import annotations

import statistics

from .results import BackendResult, Comparison



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


def recommendations(comp: Comparison) -> list[dict]:
    """One entry per question: the backend, the deciding figure, and the runner-up."""
    ok = [b for b in comp.backends if b.status == "ok" and b.role != "plan"]
    quant = [b for b in ok if any(r.quantized for r in b.layers)]
    ref = comp.reference()
    decode = [str(m) for m in comp.settings.get("decode_m", [])]
    all_m = [str(m) for m in comp.settings.get("m_values", [])]
    out = []

    def add(question: str, metric: str, unit: str, cands: list[tuple[float, str]], base: float | None) -> None:
        pick = _pick(cands)
        if pick is None:
            return
        name, value, runner = pick
        rel = f" ({value / base:.2f}× fp16)" if base else ""
        out.append({"question": question, "backend": name, "metric": metric, "value": value, "unit": unit,
                    "figure": f"{metric} {value:.4g} {unit}{rel}",
                    "runner_up": None if runner is None else {"backend": runner[0], "value": runner[1]}})

    if decode:
        m = decode[0]
        add(f"batch-{m} decode", f"Σ linear latency at M={m}", "µs",
            [(v, b.name) for b in ok if (v := layer_latency_sum(b, m)) is not None],
            layer_latency_sum(ref, m) if ref else None)
    if all_m:
        m = all_m[-1]
        add(f"large-batch prefill (M={m})", f"Σ linear latency at M={m}", "µs",
            [(v, b.name) for b in ok if (v := layer_latency_sum(b, m)) is not None],
            layer_latency_sum(ref, m) if ref else None)
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


def sensitive_layers(comp: Comparison, top: int = 5) -> list[tuple[str, float, str, str]]:
    """The layers with the largest error across quantized backends:
    (layer, median over backends, measure, the backend where it is worst)."""
    key = "loss_delta" if any("loss_delta" in r.error for b in comp.backends for r in b.layers) else "rel_isolated"
    per_layer: dict[str, list[tuple[float, str]]] = {}
    for b in comp.backends:
        if b.status != "ok" or b.role == "plan":
            continue
        for r in b.layers:
            if r.quantized and r.error.get(key) is not None:
                per_layer.setdefault(r.name, []).append((r.error[key], b.name))
    ranked = sorted(((statistics.median(v for v, _ in vals), n) for n, vals in per_layer.items()), reverse=True)
    return [(n, v, key, max(per_layer[n])[1]) for v, n in ranked[:top]]

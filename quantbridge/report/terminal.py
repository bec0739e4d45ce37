"""Terminal tables (rich) rendered from a Comparison: the whole-model summary and the
recommendation first, then the per-layer table (shortened to the layers that matter most
unless every layer is asked for)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantbridge.report.common import (STEP_HEAD, drift_note, plan_rows, probe_note, probe_overhead_label, spec_label,
                                       step_rows, timing_note)
from quantbridge.results.recommend import layer_latency_sum as _layer_sum
from quantbridge.results.recommend import recommendations, timing_drift
from quantbridge.results.schema import Comparison


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _median(vals: list[float]) -> float | None:
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summary_table(comp: Comparison) -> Table:
    t = Table(title=f"{comp.model.get('name')} on {comp.device.get('name')} — whole model", title_justify="left")
    for col in ("backend", "status", "timing", "weights", "kernel", "weight MB", "bits/w", "rel err iso (median)", "eval ppl",
                "probe overhead"):
        t.add_column(col, justify="left" if col in ("backend", "status", "kernel") else "right")
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    for b in comp.backends:
        if b.status != "ok":
            t.add_row(b.name, f"[red]{b.status}[/red]", "", "", escape(b.reason or ""), *[""] * 5)
            continue
        overhead = b.model_metrics.get("probe_overhead_pct", {})
        mm = b.model_metrics
        t.add_row(
            b.name, "ok", escape(b.timing or ""), escape(b.weights or ""), escape(b.kernel or ""), _fmt(b.weight_bytes / 1e6, ".2f"),
            _fmt(b.bits_per_weight or None, ".2f"),
            # no layers: an engine row (its own whole-model run), whose per-layer error is not measured
            _fmt(_median([layer.error.get("rel_isolated") for layer in b.layers if layer.quantized] or [0.0])
                 if b.layers else None),
            _fmt(b.model_metrics.get("eval_ppl"), ".1f"),
            " / ".join(probe_overhead_label(mm, m) for m in ms if m in overhead),
        )
    return t


def model_table(comp: Comparison) -> Table:
    """The rows side by side as a deployment table: memory, decode tokens/s, perplexity."""
    decode = [str(m) for m in comp.settings.get("decode_m", [])]
    t = Table(title="memory, speed, quality per row", title_justify="left")
    for col in ("backend", "weight MB", "peak memory MB", *[f"tokens/s M={m}" for m in decode], "eval ppl",
                "per-layer figures"):
        t.add_column(col, justify="left" if col in ("backend", "per-layer figures") else "right")
    for b in comp.backends:
        if b.status != "ok":
            continue
        mm = b.model_metrics
        tps = mm.get("decode_tokens_per_s", {})
        t.add_row(b.name, _fmt(b.weight_bytes / 1e6, ".1f"), _fmt((mm.get("peak_memory_bytes") or 0) / 1e6 or None, ".0f"),
                  *[_fmt(tps.get(m), ".1f") if m in tps else escape(mm.get("decode_not_measured", {}).get(m, "—"))
                    for m in decode],
                  _fmt(mm.get("eval_ppl"), ".2f"), "yes" if b.layers else escape(mm.get("per_layer", "none")))
    return t


def latency_table(comp: Comparison) -> Table:
    """Sum of per-linear median latencies per M, and the ratio to the reference."""
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    ref = comp.reference()
    t = Table(title=f"Σ linear-layer latency, µs (× {ref.name if ref else 'reference'})", title_justify="left")
    t.add_column("backend")
    for m in ms:
        t.add_column(f"M={m}", justify="right")
    for b in comp.backends:
        if b.status != "ok":
            continue
        cells = []
        for m in ms:
            mine = _layer_sum(b, m)
            base = _layer_sum(ref, m) if ref and ref.status == "ok" else None
            cells.append(f"{_fmt(mine, '.1f')}" + (f" ({mine / base:.2f}×)" if mine and base else ""))
        t.add_row(b.name, *cells)
    return t


def step_table(comp: Comparison) -> Table:
    t = Table(title="whole step per M: step time, the linears' share, host cost per layer call", title_justify="left")
    for col in STEP_HEAD:
        t.add_column(col, justify="left" if col in ("backend", "timing") else "right")
    for row in step_rows(comp):
        t.add_row(*map(escape, row))
    return t


SHORT_LAYERS = 10  # per-layer rows printed by default; --layers prints every one


def recommendation_table(comp: Comparison) -> Table | None:
    """recommend.recommendations as a table: which row to pick for what, its figure, the runner-up."""
    recs = recommendations(comp)
    if not recs:
        return None
    t = Table(title="recommendation, from this run's numbers", title_justify="left")
    for col in ("for", "pick", "figure", "runner-up"):
        t.add_column(col)
    for r in recs:
        up = r["runner_up"]
        t.add_row(escape(r["question"]), escape(r["backend"]), escape(r["figure"]),
                  "" if not up else f"{escape(up['backend'])} ({up['value']:.4g})")
    return t


def _layers_that_matter(comp: Comparison, shown: list, count: int) -> list[int]:
    """Indices of the `count` layers with the largest isolated error in any shown row (the slowest
    at the first M where no row quantizes), in model order."""
    m0 = next(iter(str(m) for m in comp.settings.get("m_values", [])), None)

    def key(i: int) -> float:
        errs = [b.layers[i].error.get("rel_isolated") for b in shown if b.layers[i].quantized]
        errs = [e for e in errs if e is not None]
        if errs:
            return max(errs)
        lat = [b.layers[i].latency_us.get(m0, {}).get("median") for b in shown] if m0 else []
        return -1.0 / (1.0 + max((v for v in lat if v is not None), default=0.0))  # below any error, slowest first

    n = len(shown[0].layers)
    return sorted(sorted(range(n), key=key, reverse=True)[:count])


def _layer_rows(comp: Comparison) -> list:
    """The rows the per-layer table shows: measured rows with layers, else the reference."""
    with_layers = [b for b in comp.backends if b.status == "ok" and b.layers]  # engine rows have none
    return [b for b in with_layers if b.role != "reference"] or with_layers


def layer_table(comp: Comparison, top: int | None = None) -> Table:
    """Per-layer error and latency; `top`: only that many layers, those _layers_that_matter."""
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    m0 = ms[0] if ms else None
    ref = comp.reference()
    ref_lat = {layer.name: layer.latency_us for layer in ref.layers} if ref and ref.status == "ok" else {}
    shown = _layer_rows(comp)
    ref_name = ref.name if ref else "reference"
    total = len(shown[0].layers) if shown else 0
    picked = _layers_that_matter(comp, shown, top) if shown and top is not None and top < total else range(total)
    t = Table(title=f"per layer: isolated rel. error, latency at M={m0} (×{ref_name})", title_justify="left")
    t.add_column("layer", no_wrap=True)
    t.add_column("N×K", justify="right")
    if m0:
        t.add_column(f"{ref_name} µs", justify="right")
    for b in shown:
        t.add_column(f"{b.name} err", justify="right")
        t.add_column(f"{b.name} µs", justify="right")
    if not shown:
        return t
    for i in picked:
        layer = shown[0].layers[i]
        base = ref_lat.get(layer.name, {}).get(m0, {}).get("median") if m0 else None
        row = [layer.name, f"{layer.shape[0]}×{layer.shape[1]}"] + ([_fmt(base, ".1f")] if m0 else [])
        for b in shown:
            rec = b.layers[i]
            mine = rec.latency_us.get(m0, {}).get("median") if m0 else None
            ratio = f" ({mine / base:.2f}×)" if mine and base else ""
            err = _fmt(rec.error.get("rel_isolated")) if rec.quantized else "kept"
            row += [err, f"{_fmt(mine, '.1f')}{ratio}"]
        t.add_row(*row)
    return t


def print_comparison(comp: Comparison, console: Console | None = None, layers: bool | None = None,
                     all_layers_hint: str = "--layers") -> None:
    """The whole-model summary and the recommendation first, then the other whole-model tables,
    then the per-layer table: SHORT_LAYERS layers (None), every layer (True) or none (False);
    `all_layers_hint` says how to see every layer when the table is shortened."""
    console = console or Console()
    if comp.model.get("note"):  # what the reference is (a GGUF's weights dequantized, random seeded weights)
        console.print(f"[dim]{escape(comp.model.get('name', ''))}: {escape(comp.model['note'])}[/dim]")
    console.print(summary_table(comp))
    rec = recommendation_table(comp)
    if rec is not None:
        console.print(rec)
    console.print(model_table(comp))
    console.print(latency_table(comp))
    console.print(step_table(comp))
    if layers is not False:
        console.print(layer_table(comp, None if layers else SHORT_LAYERS))
        shown = _layer_rows(comp)
        total = len(shown[0].layers) if shown else 0
        if not layers and total > SHORT_LAYERS:  # on a line of its own, never cut at the table's width
            which = ("the largest isolated error" if any(r.quantized for b in shown for r in b.layers)
                     else "the longest latency (no row quantizes)")
            console.print(f"{SHORT_LAYERS} of {total} layers shown, those with {which}; every layer: {all_layers_hint}",
                          markup=False, highlight=False, soft_wrap=True)
    for line in comp.findings:
        console.print(f"• {escape(line)}")
    s = comp.settings
    console.print(
        f"[dim]{timing_note(s)}; error on {s.get('eval_tokens')} held-out tokens; {spec_label(s.get('spec', {}), s.get('group_size_auto', False))}; "
        f"{probe_note(comp)}[/dim]"
    )
    cal = s.get("calibration")
    if cal:
        console.print(f"[dim]calibration for calibrated quantizers: {cal['samples']} x {cal['length']} tokens "
                      f"({cal['chosen']}; --full-calibration for 128 x 512)[/dim]")
    drift = timing_drift(comp)
    if drift is not None:
        console.print(f"[dim]{drift_note(drift)}[/dim]")
    if plan_rows(comp):
        for quantity, pred, meas, diff in plan_rows(comp):
            console.print(f"plan {quantity}: predicted {pred}, measured {meas} ({diff})")

"""The comparison report as one self-contained HTML file (figures inlined) or as Markdown.

Both render only from a saved Comparison (results.json), never from in-memory state.
"""

from __future__ import annotations

import base64
import html

from quantbridge.report.common import STEP_HEAD, drift_note, plan_rows, spec_label, step_rows, timing_note
from quantbridge.results.recommend import (layer_latency_sum, median_isolated_error, recommendations, rounding_floor,
                                           sensitive_layers, timing_drift)
from quantbridge.results.schema import Comparison

SENSITIVE_HEAD = ["layer", "value", "worst backend", "measure"]
NO_SENSITIVE = "none: no quantized layer's error is above rounding level ({floor:.2g})"


def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def _error_cell(b) -> float | None:
    """The row's median isolated error; an exact 0 is a value (shown as 0), not a missing one."""
    e = median_isolated_error(b)
    return 0.0 if e is None and b.role == "reference" else e


def summary_rows(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    decode = [str(m) for m in comp.settings.get("decode_m", [])]
    prefill = [str(m) for m in comp.settings.get("prefill_m", [])]
    head = ["backend", "status", "timing", "weights", "kernel", "weight MB", "bits/w", "median isolated error", "eval ppl",
            *[f"tokens/s M={m}" for m in decode], *[f"prefill {m} µs" for m in prefill], "peak memory MB",
            *[f"Σ layer µs M={m} (× fp16)" for m in decode + prefill]]
    ref = comp.reference()
    rows = []
    for b in comp.backends:
        if b.status != "ok":
            rows.append([b.name, b.status, "", "", b.reason or ""] + [""] * (len(head) - 5))
            continue
        mm = b.model_metrics
        sums = []
        for m in decode + prefill:
            v = layer_latency_sum(b, m)
            base = layer_latency_sum(ref, m) if ref and ref.status == "ok" else None
            sums.append(f"{_fmt(v, '.1f')}" + (f" ({v / base:.2f}×)" if v and base else ""))
        rows.append([
            b.name, b.status, b.timing or "", b.weights or "", b.kernel or "", _fmt(b.weight_bytes / 1e6, ".2f"),
            _fmt(b.bits_per_weight, ".2f"), _fmt(_error_cell(b)),
            _fmt(mm.get("eval_ppl"), ".5g"),
            *[_fmt(mm.get("decode_tokens_per_s", {}).get(m), ".1f") for m in decode],
            *[_fmt(mm.get("prefill_latency_us"), ".1f") for _ in prefill],
            _fmt((mm.get("peak_memory_bytes") or 0) / 1e6 or None, ".1f"), *sums,
        ])
    return head, rows


TELEMETRY_HEAD = ["backend", "peak memory MB", "memory measured as", "SM clock MHz", "memory clock MHz",
                  "power W", "temperature °C", "samples"]


def telemetry_rows(comp: Comparison) -> list[list[str]]:
    """Per row: peak memory and NVML samples as median (min–max); '—' where not measured."""
    def spread(t: dict, key: str) -> str:
        v = t.get(key)
        return "—" if not v else f"{v['median']:.4g} ({v['min']:.4g}–{v['max']:.4g})"

    rows = []
    for b in comp.backends:
        t = b.model_metrics.get("telemetry") if b.status == "ok" else None
        if t:
            rows.append([b.name, _fmt(t["peak_memory_bytes"] / 1e6, ".1f"), t["memory_kind"],
                         *(spread(t, k) for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c")),
                         str(t["samples"])])
    return rows


def memory_note(comp: Comparison) -> str:
    """How far the peak memory column is each row's own, from how the rows ran."""
    how = str(comp.settings.get("isolation") or "none")
    if how == "process":
        return ("Every row ran in its own child process (the model loaded again there, the reference handed over in "
                "a file; on CUDA the comparing process held no weights on the GPU meanwhile), so each peak is that "
                "row's alone: model, inputs and its own layers.")
    return ("The rows ran in one process (isolation " + how + "): on CUDA the allocator's peak is reset per row but "
            "the model stays resident; on the CPU the resident set is the process's, so a row can carry memory an "
            "earlier row left behind. compare --isolation process measures each row on its own.")


def _table_html(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _table_md(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _sections(comp: Comparison) -> dict:
    s = comp.settings
    recs = recommendations(comp)
    sens = sensitive_layers(comp)
    return {
        "title": f"quantbridge: {comp.model.get('name')} on {comp.device.get('name')}",
        "setup": (f"{spec_label(s.get('spec', {}), s.get('group_size_auto', False))}, {s.get('dtype')} on {s.get('device')}; {timing_note(s)}; perplexity on "
                  f"{s.get('eval_tokens')} tokens ({s.get('eval_seqs')} × {s.get('eval_context', s.get('eval_len'))}"
                  f"-token context) of {s.get('eval_source', 'the shipped held-out split')}."
                  + (f" {drift_note(d)}." if (d := timing_drift(comp)) is not None else "")),
        "summary": summary_rows(comp),
        "steps": step_rows(comp),
        "recs": [[r["question"], r["backend"], r["figure"],
                  "" if not r["runner_up"] else f"{r['runner_up']['backend']} ({r['runner_up']['value']:.4g})"]
                 for r in recs],
        "sensitive": [[n, f"{v:.4g}", worst, "eval loss increase, this layer alone (median over backends)"
                       if k == "loss_delta" else "median isolated relative error over backends"]
                      for n, v, k, worst in sens] or [[NO_SENSITIVE.format(floor=rounding_floor(comp)), "", "", ""]],
        "telemetry": telemetry_rows(comp),
        "memory_note": memory_note(comp),
        "findings": comp.findings,
        "plan": plan_rows(comp),
    }


def to_html(comp: Comparison) -> str:
    from quantbridge.report.plots import figures

    sec = _sections(comp)
    figs = "".join(
        f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, png in figures(comp).items())
    findings = "".join(f"<li>{html.escape(f)}</li>" for f in sec["findings"])
    plan = (f"<h2>Plan: predicted vs measured</h2>{_table_html(['quantity', 'predicted', 'measured', 'difference'], sec['plan'])}"
            if sec["plan"] else "")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,"
             "th:first-child{text-align:left}figure{display:inline-block;margin:1em}img{max-width:100%}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(sec['title'])}</title><style>{style}</style></head>
<body>
<h1>{html.escape(sec['title'])}</h1>
<p>{html.escape(sec['setup'])}</p>
<h2>Summary</h2>
{_table_html(*sec['summary'])}
<h2>Whole step per M</h2>
{_table_html(STEP_HEAD, sec['steps'])}
<h2>Recommendation</h2>
{_table_html(['question', 'backend', 'deciding figure', 'runner-up'], sec['recs'])}
<ul>{findings}</ul>
{plan}
<h2>Sensitive layers</h2>
{_table_html(SENSITIVE_HEAD, sec['sensitive'])}
<h2>Memory and device telemetry</h2>
<p>{html.escape(sec['memory_note'])}</p>
{_table_html(TELEMETRY_HEAD, sec['telemetry'])}
<h2>Per layer</h2>
{figs}
</body></html>
"""


def to_markdown(comp: Comparison) -> str:
    sec = _sections(comp)
    parts = [f"# {sec['title']}", sec["setup"], "## Summary", _table_md(*sec["summary"]), "## Whole step per M",
             _table_md(STEP_HEAD, sec["steps"]), "## Recommendation",
             _table_md(["question", "backend", "deciding figure", "runner-up"], sec["recs"])]
    parts += [f"- {f}" for f in sec["findings"]]
    if sec["plan"]:
        parts += ["## Plan: predicted vs measured", _table_md(["quantity", "predicted", "measured", "difference"], sec["plan"])]
    parts += ["## Sensitive layers", _table_md(SENSITIVE_HEAD, sec["sensitive"]),
              "## Memory and device telemetry", sec["memory_note"], _table_md(TELEMETRY_HEAD, sec["telemetry"])]
    return "\n\n".join(parts) + "\n"



"""How true are compare's graph-mode timings? Three checks and the host cost, from saved runs.

  python benchmarks/graph_fidelity.py GRAPH.json REPEAT.json BENCH.json EAGER.json OUT.md [EVENTS.json]

1. Step: per backend and M, Σ per-layer graph time + the in-graph remainder (both from the
   probed replays) against the replayed step time of the graph without probes (target 5 %).
2. Kernel: each layer's graph time against `quantbridge bench`'s CUDA-graph time of the same
   kernel at the same (K, N, M) (target 10 %); the bench times one layer alone after an L2
   flush, the step times it between its neighbours.
3. Repeat: the same command run twice, per-layer medians and Σ (target 3 %).
4. Host: eager mode's host enqueue cost per layer call, per backend, against fp16's.
With EVENTS.json (benchmarks/event_placement.py), check 2 again against the kernel alone after an
L2 flush by reads (clean lines), beside the same after a flush by writes, from one run.
Writes OUT.md and OUT.json (every number behind the tables).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def _ok(comp: dict) -> dict[str, dict]:
    return {b["name"]: b for b in comp["backends"] if b["status"] == "ok"}


def step_check(comp: dict) -> list[dict]:
    """Σ layers against the step without probes, and what the probes cost inside the graph."""
    out = []
    for name, b in sorted(_ok(comp).items()):
        mm = b["model_metrics"]
        for m, step in mm["forward_us"].items():
            if m not in mm.get("in_graph_span_us", {}):
                continue
            lin, span = mm["linear_sum_us"][m]["median"], mm["in_graph_span_us"][m]["median"]
            # Per probed layer (two events each): what the results measured against the plain step;
            # older results probed every layer in one graph and are worked out from its span.
            per_layer = (mm.get("probe_cost_per_layer_us") or {}).get(m)
            if per_layer is None:
                per_layer = (span - step["median"]) / (len(b["layers"]) + 1)
            out.append({"backend": name, "m": int(m), "timing": mm["timing"][m], "linear_sum_us": lin,
                        "step_us": step["median"], "remainder_us": step["median"] - lin,
                        "linear_share_pct": 100 * lin / step["median"], "probed_span_us": span,
                        "probe_graphs": (mm.get("probe_graphs") or {}).get(m, 1),
                        "probe_overhead_pct": mm["probe_overhead_pct"][m],
                        "probe_cost_per_layer_us": per_layer})
    return out


def remainder_spread(steps: list[dict]) -> list[dict]:
    """The remainder is the same work in every row (only the linears differ): its spread across
    rows at one M says how well Σ layers accounts for the step."""
    by_m: dict[int, list[float]] = {}
    for r in steps:
        by_m.setdefault(r["m"], []).append(r["remainder_us"])
    return [{"m": m, "rows": len(v), "min_us": min(v), "max_us": max(v),
             "spread_pct": 100 * (max(v) - min(v)) / statistics.median(v)} for m, v in sorted(by_m.items())]


def _step_layers(comp: dict):
    """(backend, layer, k, n, m, in-step median µs, the key of the same kernel alone) for every layer
    timed in the step; unquantized layers of a quantized row run fp16's kernel."""
    for name, b in sorted(_ok(comp).items()):
        for layer in b["layers"]:
            n, k = layer["shape"]
            for m, lat in layer["latency_us"].items():
                alone = name if layer["quantized"] or name == "fp16" else "fp16"
                yield name, layer["name"], k, n, int(m), lat["median"], (alone, k, n, int(m))


def kernel_check(comp: dict, bench: dict) -> list[dict]:
    times = {(r["backend"], r["k"], r["n"], r["m"]): r["median_us"] for r in bench["rows"] if r["status"] == "ok"}
    return [{"backend": name, "layer": layer, "k": k, "n": n, "m": m, "graph_us": us, "bench_us": times[key],
             "dev_pct": 100 * (us - times[key]) / times[key]}
            for name, layer, k, n, m, us, key in _step_layers(comp) if key in times]


def flush_check(comp: dict, events: dict) -> list[dict]:
    """Each layer in the step against the kernel alone, L2 evicted by writes and by reads."""
    alone = {(r["backend"], r["k"], r["n"], r["m"]): (r["inside"], r["inside_read_flush"]) for r in events["rows"]}
    return [{"backend": name, "layer": layer, "k": k, "n": n, "m": m, "graph_us": us,
             "write_dev_pct": 100 * (us - alone[key][0]) / alone[key][0],
             "read_dev_pct": 100 * (us - alone[key][1]) / alone[key][1]}
            for name, layer, k, n, m, us, key in _step_layers(comp) if key in alone]


def _summary(rows: list[dict], col: str) -> dict[tuple, list[float]]:
    by: dict[tuple, list[float]] = {}
    for row in rows:
        by.setdefault((row["backend"], row["m"]), []).append(row[col])
    return by


def repeat_check(a: dict, b: dict) -> list[dict]:
    out = []
    ra, rb = _ok(a), _ok(b)
    for name in sorted(ra.keys() & rb.keys()):
        la = {x["name"]: x for x in ra[name]["layers"]}
        devs: dict[str, list[float]] = {}
        for layer in rb[name]["layers"]:
            for m, lat in layer["latency_us"].items():
                first = la[layer["name"]]["latency_us"].get(m)
                if first:
                    devs.setdefault(m, []).append(100 * abs(lat["median"] - first["median"]) / first["median"])
        for m, d in devs.items():
            sa = ra[name]["model_metrics"]["linear_sum_us"][m]["median"]
            sb = rb[name]["model_metrics"]["linear_sum_us"][m]["median"]
            out.append({"backend": name, "m": int(m), "layers": len(d), "median_layer_dev_pct": statistics.median(d),
                        "max_layer_dev_pct": max(d), "sum_dev_pct": 100 * abs(sb - sa) / sa})
    return out


def host_check(comp: dict) -> list[dict]:
    rows = []
    ok = _ok(comp)
    for name, b in sorted(ok.items()):
        for m in sorted({m for layer in b["layers"] for m in layer.get("host_us", {})}, key=int):
            per = [layer["host_us"][m]["median"] for layer in b["layers"] if layer["quantized"] or name == "fp16"]
            if per:
                rows.append({"backend": name, "m": int(m), "host_us_median": statistics.median(per),
                             "gpu_us_median": statistics.median(
                                 layer["latency_us"][m]["median"] for layer in b["layers"]
                                 if (layer["quantized"] or name == "fp16") and m in layer["latency_us"])})
    fp16 = {r["m"]: r["host_us_median"] for r in rows if r["backend"] == "fp16"}
    for r in rows:
        r["vs_fp16"] = r["host_us_median"] / fp16[r["m"]] if r["m"] in fp16 else None
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _flush_section(rows: list[dict], path: str) -> list[str]:
    w, r = _summary(rows, "write_dev_pct"), _summary(rows, "read_dev_pct")
    summary = [{"backend": b, "m": m, "layers": len(w[b, m]), "vs_write_flush_median_pct": statistics.median(w[b, m]),
                "vs_read_flush_median_pct": statistics.median(r[b, m]),
                "read_flush_min_pct": min(r[b, m]), "read_flush_max_pct": max(r[b, m]),
                "read_within_10pct": sum(abs(x) <= 10 for x in r[b, m])} for b, m in sorted(w)]
    return ["### 2b. The same, against the kernel alone after an L2 flush by writes and by reads", "",
            f"From `{path}` (benchmarks/event_placement.py, events inside the graph; its shapes only). "
            "A flush by writes leaves L2 full of dirty lines that the timed kernel's reads pay to write "
            "back; a flush by reads leaves clean lines, as a model's step does.", "",
            _table(summary, ["backend", "m", "layers", "vs_write_flush_median_pct", "vs_read_flush_median_pct",
                             "read_flush_min_pct", "read_flush_max_pct", "read_within_10pct"]), ""]


def main(graph: str, repeat: str, bench: str, eager: str, out: str, events: str | None = None) -> None:
    g, r, bn, e = _load(graph), _load(repeat), _load(bench), _load(eager)
    steps = step_check(g)
    res = {"device": g["device"].get("name"), "step": steps, "remainder": remainder_spread(steps),
           "kernel": kernel_check(g, bn),
           "repeat": repeat_check(g, r), "host": host_check(e),
           "flush": flush_check(g, _load(events)) if events else []}
    by_bm = _summary(res["kernel"], "dev_pct")
    kernel_summary = [{"backend": b, "m": m, "layers": len(d), "median_dev_pct": statistics.median(d),
                       "min_dev_pct": min(d), "max_dev_pct": max(d), "within_10pct": sum(abs(x) <= 10 for x in d)}
                      for (b, m), d in sorted(by_bm.items())]
    res["kernel_summary"] = kernel_summary
    md = [f"# Graph-mode timing fidelity on {res['device']}", "",
          f"Sources: `{graph}`, repeat `{repeat}`, kernels `{bench}`, eager `{eager}`"
          f" (`python benchmarks/graph_fidelity.py` with these four, in this order).", "",
          "## 1. Σ layers inside the step without probes, and the probes' own cost", "",
          "The remainder is the unprobed step minus Σ layers (attention, norms, embeddings, launch "
          "gaps); the probed graph's span is longer than the unprobed step by the timing events "
          "themselves (two per layer and two per step, each a graph node).", "",
          _table(res["step"], ["backend", "m", "linear_sum_us", "step_us", "remainder_us", "linear_share_pct",
                               "probed_span_us", "probe_graphs", "probe_overhead_pct", "probe_cost_per_layer_us"]), "",
          "The same remainder across rows (target: within 5 % of each other):", "",
          _table(res["remainder"], ["m", "rows", "min_us", "max_us", "spread_pct"]), "",
          "## 2. Layer in the step vs the same kernel alone (`bench`, CUDA graph, L2 flushed; target ±10 %)", "",
          _table(kernel_summary, ["backend", "m", "layers", "median_dev_pct", "min_dev_pct", "max_dev_pct",
                                  "within_10pct"]), "",
          *(_flush_section(res["flush"], events) if events else []),
          "## 3. Two runs of the same command (target 3 %)", "",
          _table(res["repeat"], ["backend", "m", "layers", "median_layer_dev_pct", "max_layer_dev_pct", "sum_dev_pct"]),
          "", "## 4. Eager host enqueue cost per layer call (median over layers)", "",
          _table(res["host"], ["backend", "m", "host_us_median", "gpu_us_median", "vs_fp16"]), ""]
    Path(out).write_text("\n".join(md))
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])

"""Render a kernel-benchmark result (bench.json): markdown tables and a roofline plot."""

from __future__ import annotations

from collections import defaultdict

from quantbridge.report.common import flush_note


def _cell(r: dict) -> str:
    if r["status"] == "unavailable":
        return "n/a"
    if r["status"] != "ok":
        return r["status"]
    sp = f" ({r['speedup_vs_bf16']:.2f}×)" if r.get("speedup_vs_bf16") else ""
    return f"{r['median_us']:.1f}{sp}"


def _launch(res: dict) -> str:
    """', which was X µs (median over rows)': the latency a replay adds around the timed call."""
    got = sorted(r["graph_launch_us"] for r in res["rows"] if r.get("graph_launch_us") is not None)
    return f", which was {got[len(got) // 2]:.1f} µs (median over rows)" if got else ""


def to_markdown(res: dict) -> str:
    dev = res["device"]
    bw = res["copy_bandwidth"]["bytes_per_s"]
    s = res["settings"]
    lines = [
        f"# INT4 kernel benchmark on {dev.get('name')}",
        "",
        *([f"**Part of a run that was stopped**: {len(res['rows'])} rows, measured before it stopped.", ""]
          if res.get("complete") is False else []),
        f"- device copy bandwidth (read+write): **{bw / 1e12:.2f} TB/s**; dense {s['dtype']} matmul: "
        f"**{res['matmul_tflops']:.3g} TFLOP/s**",
        f"- driver {dev.get('driver', '—')}, torch {dev['libraries'].get('torch')}, triton "
        f"{dev['libraries'].get('triton')}, bitsandbytes {dev['libraries'].get('bitsandbytes')}",
        f"- {s['dtype']} activations, INT4 group {s['spec']['group_size']}, "
        f"{'symmetric' if s['spec']['symmetric'] else 'asymmetric'}; median of {s['runs']} runs after "
        f"{s['warmup']} warm-up, {'CUDA events' if dev.get('type') == 'cuda' else 'perf_counter_ns'}, "
        f"fresh random input per run, {flush_note(s.get('l2_flush'))}; timing mode: "
        f"{', '.join(sorted({r.get('timing') or '—' for r in res['rows'] if r['status'] == 'ok'}))} "
        "(cuda-graph = one captured call replayed, timed by events inside the graph around the call: kernel "
        f"time without host launch overhead or the graph's launch latency{_launch(res)})",
        f"- cell: median µs (speedup vs the unquantized {s['dtype']} `fp16` row); %BW: bytes moved (stored weight + x + y) per "
        "second as a share of the copy bandwidth",
        "",
    ]
    kernels = {}
    for r in res["rows"]:
        if r["status"] == "ok":
            kernels.setdefault(r["backend"], r["kernel"])
    lines += ["| backend | kernel that ran |", "|---|---|"]
    lines += [f"| {b} | `{k}` |" for b, k in kernels.items()]
    not_run = {}  # a row that never ran anywhere: its first reason (the library, the device, a shape limit)
    for r in res["rows"]:
        if r["backend"] not in kernels and r["status"] == "unavailable":
            not_run.setdefault(r["backend"], r["reason"])
    lines += [f"| {b} | not run: {why} |" for b, why in not_run.items()]
    lines.append("")
    by_shape: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in res["rows"]:
        by_shape[(r["k"], r["n"])].append(r)
    reference = res["settings"].get("reference", "fp16")  # files written before it was recorded: fp16
    for (k, n), rows in by_shape.items():
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        cells = {(r["backend"], r["m"]): r for r in rows}
        lines.append(f"## K={k} × N={n}")
        lines.append("")
        head = ["M"] + backends + [f"{b} %BW" for b in backends if b != reference]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in sorted({r["m"] for r in rows}):
            row = [str(m)] + [_cell(cells[(b, m)]) if (b, m) in cells else "" for b in backends]
            for b in backends:
                if b == reference:
                    continue
                r = cells.get((b, m))
                row.append(f"{r['pct_copy_bw']:.0f}%" if r and r.get("pct_copy_bw") else "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    bad = [r for r in res["rows"] if r["status"] in ("incorrect", "failed")]
    if bad:
        lines.append("## Problems")
        lines += [f"- {r['backend']} K={r['k']} N={r['n']} M={r['m']}: {r['status']} — {r['reason']}" for r in bad]
    return "\n".join(lines) + "\n"


def roofline_png(res: dict) -> bytes:
    """Achieved TFLOP/s against arithmetic intensity, under the measured memory and compute roofs (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = res["copy_bandwidth"]["bytes_per_s"]
    peak = res["matmul_tflops"] * 1e12
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    pts: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for r in res["rows"]:
        if r["status"] != "ok" or not r["median_us"]:
            continue
        flops = 2 * r["m"] * r["k"] * r["n"]
        pts[r["backend"]][0].append(flops / r["bytes"])
        pts[r["backend"]][1].append(flops / (r["median_us"] * 1e-6) / 1e12)
    xs = [x for v in pts.values() for x in v[0]] or [1.0]
    lo, hi = min(xs) / 2, max(xs) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(bw * x, peak) / 1e12 for x in grid], "k--", lw=1.2,
            label=f"roof: copy {bw / 1e12:.2f} TB/s, matmul {peak / 1e12:.0f} TFLOP/s")
    for name, (x, y) in pts.items():
        ax.scatter(x, y, s=18, label=name, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved: stored weight + x + y)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"INT4 linear kernels on {res['device'].get('name')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

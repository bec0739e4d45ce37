"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io

from quantbridge.results.recommend import layer_latency_sum
from quantbridge.results.schema import Comparison


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _ok(comp: Comparison, quantized_only: bool = False):
    return [b for b in comp.backends if b.status == "ok" and (not quantized_only or any(r.quantized for r in b.layers))]


def _short(name: str) -> str:
    return name.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


ROWS_PER_PANEL = 56  # layers per column of the heatmap: 8 Llama blocks of 7 linears


def heatmap(comp: Comparison, value, title: str, cbar: str, log: bool = False) -> bytes | None:
    """Layer × backend matrix of value(backend_result, layer_record) (None = blank).

    A deep model's layers are split into side-by-side panels of at most ROWS_PER_PANEL rows,
    with the backend names above and below each panel and one colour scale for all of them,
    so the figure stays about a screen high.
    """
    backends = [b for b in _ok(comp) if b.role != "reference" and b.layers]  # engine rows have no layers
    if not backends:
        return None
    layers = [r.name for r in backends[0].layers]
    grid = []
    for i, n in enumerate(layers):
        grid.append([value(b, b.layers[i]) if i < len(b.layers) and b.layers[i].name == n else None for b in backends])
    vals = [v for row in grid for v in row if v is not None and (v > 0 or not log)]
    if not vals:
        return None
    plt = _plt()
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    panels = max(1, -(-len(layers) // ROWS_PER_PANEL))
    per = -(-len(layers) // panels)
    norm = LogNorm(vmin=min(vals), vmax=max(vals)) if log and min(vals) > 0 else Normalize(min(vals), max(vals))
    fig, axes = plt.subplots(1, panels, figsize=(panels * (1.6 + 0.8 * len(backends)) + 1.0, 1.6 + 0.2 * per),
                             squeeze=False, layout="constrained")  # room for each panel's layer names
    names = [b.name for b in backends]
    for p, ax in enumerate(axes[0]):
        lo, hi = p * per, min(len(layers), (p + 1) * per)
        im = ax.imshow(arr[lo:hi], aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(backends)), names, rotation=30, ha="right")
        ax.tick_params(axis="x", top=True, labeltop=True)  # backend names above the panel too
        ax.set_yticks(range(hi - lo), [_short(n) for n in layers[lo:hi]], fontsize=7)
    fig.suptitle(title)
    fig.colorbar(im, ax=list(axes[0]), label=cbar, shrink=0.6)
    return _png(fig)


def error_vs_depth(comp: Comparison) -> bytes | None:
    backends = _ok(comp, quantized_only=True)
    if not backends:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for b in backends:
        xs = [i for i, r in enumerate(b.layers) if r.error.get("rel_propagated") is not None]
        (line,) = ax.plot(xs, [b.layers[i].error["rel_propagated"] for i in xs], label=f"{b.name} propagated")
        xs = [i for i, r in enumerate(b.layers) if r.quantized]
        ax.plot(xs, [b.layers[i].error["rel_isolated"] for i in xs], ls=":", marker=".", color=line.get_color(),
                label=f"{b.name} isolated")
    ax.set_xlabel("layer index (execution order)")
    ax.set_ylabel("relative L2 error")
    positive = any(v > 0 for b in backends for r in b.layers for v in (r.error.get("rel_propagated"),
                                                                        r.error.get("rel_isolated")) if v)
    ax.set_yscale("log" if positive else "linear")  # exact rows (GGUF codes through the reference) are all 0
    ax.set_title("error vs depth")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def latency_by_batch(comp: Comparison) -> bytes | None:
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    backends = _ok(comp)
    if not backends or not ms:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b in backends:
        pts = [(int(m), v) for m in ms if (v := layer_latency_sum(b, m)) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=b.name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M (tokens per step)")
    ax.set_ylabel("Σ linear-layer latency, µs")
    ax.set_title("latency by batch size")
    ax.legend(fontsize=8)
    return _png(fig)


def overhead(b, r, m: str, ref_rows: dict) -> float | None:
    mine = r.latency_us.get(m, {}).get("median")
    base = ref_rows.get(r.name, {}).get(m, {}).get("median")
    return None if not mine or not base else mine / base


# Below this many compared rows a heatmap is a column or two cut into strips: lines against
# depth, one per row, show the same numbers readably.
HEATMAP_MIN_ROWS = 4


def latency_vs_depth(comp: Comparison, ms: list[str], ref_rows: dict) -> bytes | None:
    """Each layer's latency over fp16's against its depth: a line per row and M (few rows)."""
    backends = [b for b in _ok(comp) if b.role != "reference" and b.layers]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for b in backends:
        color = None
        for m, style in zip(ms, ("-", "--")):
            pts = [(i, v) for i, r in enumerate(b.layers) if (v := overhead(b, r, m, ref_rows)) is not None]
            if pts:
                (line,) = ax.plot(*zip(*pts), ls=style, marker=".", color=color, label=f"{b.name} M={m}")
                color, drawn = line.get_color(), True
    if not drawn:
        _plt().close(fig)
        return None
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer index (execution order)")
    ax.set_ylabel("latency × fp16 (per layer)")
    ax.set_title("latency vs fp16 against depth")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def figures(comp: Comparison) -> dict[str, bytes]:
    """Every figure the report shows, by caption: heatmaps for many rows, lines against depth for few."""
    ref = comp.reference()
    ref_rows = {r.name: r.latency_us for r in ref.layers} if ref and ref.status == "ok" else {}
    out: dict[str, bytes] = {}
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    ms = ms[:1] + ms[-1:] if len(ms) > 1 else ms
    many = len([b for b in _ok(comp) if b.role != "reference" and b.layers]) >= HEATMAP_MIN_ROWS
    if many:
        for m in ms:
            png = heatmap(comp, lambda b, r, m=m: overhead(b, r, m, ref_rows),
                          f"latency vs fp16 at M={m}", "× fp16 (per layer)", log=True)
            if png:
                out[f"Latency overhead vs fp16 per layer, M={m}"] = png
        png = heatmap(comp, lambda b, r: r.error.get("rel_isolated") if r.quantized else None,
                      "isolated relative error", "relative L2 error", log=True)
        if png:
            out["Isolated error per layer"] = png
    elif png := latency_vs_depth(comp, ms, ref_rows):
        out[f"Latency vs fp16 per layer against depth, M={' and '.join(ms)}"] = png
    # Error against depth is a line plot at any number of rows (isolated and propagated).
    for caption, fn in (("Error vs depth", error_vs_depth), ("Latency by batch size", latency_by_batch)):
        png = fn(comp)
        if png:
            out[caption] = png
    return out

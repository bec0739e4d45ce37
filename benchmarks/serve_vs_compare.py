"""A layer's GPU time while vLLM serves (inside its captured CUDA graphs) against compare's
graph-mode time for the same layer and kernel, per M (issue target: within 10 % at M = 1).

  python3 benchmarks/serve_vs_compare.py SERVE_RESULTS.json COMPARE_RESULTS.json OUT.md [--m 1]

SERVE_RESULTS.json is what `quantbridge serve-stats` wrote (its `[graph]` row); COMPARE_RESULTS.json
a `compare --mode graph` of the same checkpoint. vLLM fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, so only layers the two name alike (o_proj, down_proj, ...) are paired, with the
same kernel; the others are listed as not comparable, with why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET = 0.10


def _graph_row(serve: dict) -> dict:
    rows = [b for b in serve["backends"] if b.get("timing") == "graph" and b["status"] == "ok"]
    if not rows:
        raise SystemExit("serve results hold no graph row: was the server run with CUDA graphs and profiling on?")
    return rows[0]


def _compare_row(comp: dict, kernel_of: dict[str, str]) -> dict:
    """compare's measured row whose layers ran the kernel the server ran (the first such)."""
    kernels = set(kernel_of.values())
    for b in comp["backends"]:
        if b["status"] == "ok" and b.get("role") == "measured" and {r["kernel"] for r in b["layers"]} & kernels:
            return b
    raise SystemExit(f"no ok compare row ran the server's kernel ({', '.join(sorted(kernels))})")


def pair(serve: dict, comp: dict, m: str) -> tuple[list[dict], list[tuple[str, str]]]:
    """(paired layers with both medians and their ratio, [(layer, why not paired)])."""
    graph = _graph_row(serve)
    served = {r["name"]: r for r in graph["layers"]}
    row = _compare_row(comp, {n: r["kernel"] for n, r in served.items()})
    compared = {r["name"]: r for r in row["layers"]}
    pairs, unpaired = [], []
    for name, s in sorted(served.items()):
        c = compared.get(name)
        if c is None:
            unpaired.append((name, "compare has no layer of this name (vLLM fuses q/k/v and gate/up)"))
        elif s["kernel"] != c["kernel"]:
            unpaired.append((name, f"different kernels: served {s['kernel']}, compared {c['kernel']}"))
        elif m not in s["latency_us"] or m not in c["latency_us"]:
            unpaired.append((name, f"no M={m} in {'the server' if m not in s['latency_us'] else 'compare'}"))
        else:
            a, b = s["latency_us"][m]["median"], c["latency_us"][m]["median"]
            pairs.append({"layer": name, "kernel": s["kernel"], "serve_us": a, "compare_us": b, "ratio": a / b,
                          "within": abs(a / b - 1) <= TARGET})
    return pairs, unpaired


def to_markdown(pairs: list[dict], unpaired: list[tuple[str, str]], m: str) -> str:
    lines = [f"# Serving vs compare, graph mode, M={m} (target: within {TARGET:.0%})", "",
             "| layer | kernel | serving µs | compare µs | ratio | within |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['layer']} | {p['kernel']} | {p['serve_us']:.2f} | {p['compare_us']:.2f} | {p['ratio']:.3f} | "
              f"{'yes' if p['within'] else 'no'} |" for p in pairs]
    if pairs:
        ok = sum(p["within"] for p in pairs)
        lines += ["", f"{ok} of {len(pairs)} paired layers within {TARGET:.0%}."]
    if unpaired:
        lines += ["", "Not compared:", *[f"- {n}: {why}" for n, why in unpaired]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    m = argv[argv.index("--m") + 1] if "--m" in argv else "1"
    serve, comp = (json.loads(Path(p).read_text()) for p in argv[:2])
    pairs, unpaired = pair(serve, comp, m)
    text = to_markdown(pairs, unpaired, m)
    Path(argv[2]).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Where bench's timing events sit, and what that adds: one layer's replayed CUDA graph timed three ways.

graph_fidelity (H100, 2026-12-06) found layers timed inside compare's step 8-19 % below the same
kernel timed alone by `bench` at M = 1, smallest layers worst. Prediction: bench records its
events outside `graph.replay()`, so its figure holds the GPU's graph-launch latency (a few µs,
the same for every kernel); events recorded inside the graph around the call, as compare's
probes are, hold the kernel alone. Per (K, N, M) and backend this prints, median µs over --runs
replays after an L2 flush each: outside (bench before 2026-12-06), inside (bench since), an empty
graph's replay (the launch latency alone), outside - inside, and inside again with L2 evicted by
reading a buffer instead of writing one. Second prediction (the H100 run of the first one left
fp16 at M=1 12 % slower alone than in the step, native not at all): the write-flush leaves L2
full of dirty lines, and a kernel near peak bandwidth pays for their write-back; in a step L2
holds clean weights. If so, the read-flush times are lower, most for the kernels nearest peak.

  python3 benchmarks/event_placement.py OUT.json --shapes 4096x1024,4096x4096,4096x14336 --batch 1,16 --backends fp16,native
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

from quantbridge.measure.probes import L2Flush
from quantbridge.plugin import backend as registry
from quantbridge.plugin.files import write_atomic
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.bench import parse_shapes


def _ev() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True, external=True)


def measure(layer: nn.Module, m: int, k: int, dtype: torch.dtype, flush: L2Flush, read_flush: L2Flush,
            runs: int) -> dict:
    static = torch.randn(m, k, device="cuda", dtype=dtype)
    for _ in range(3):
        layer(static)  # tuning and lazy workspaces, outside the capture
    torch.cuda.synchronize()
    a, b = _ev(), _ev()
    graph, empty = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.record()
        layer(static)
        b.record()
    with torch.cuda.graph(empty):
        static.add_(0)  # one trivial node: a graph cannot be empty
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = {"outside": [], "inside": [], "empty": [], "inside_read_flush": []}
    for _ in range(runs):
        for g, key, how in ((graph, "outside", flush), (empty, "empty", flush), (graph, "inside_read_flush", read_flush)):
            static.copy_(torch.randn_like(static))
            how()
            start.record()
            g.replay()
            stop.record()
            stop.synchronize()
            if key == "inside_read_flush":
                out[key].append(a.elapsed_time(b) * 1e3)
                continue
            out[key].append(start.elapsed_time(stop) * 1e3)
            if g is graph:
                out["inside"].append(a.elapsed_time(b) * 1e3)
    med = {key: statistics.median(v) for key, v in out.items()}
    return {**med, "outside_minus_inside": med["outside"] - med["inside"],
            "read_vs_write_flush_pct": 100 * (med["inside_read_flush"] / med["inside"] - 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shapes", default="4096x1024,4096x4096,4096x14336,14336x4096")
    ap.add_argument("--batch", default="1,16,128")
    ap.add_argument("--backends", default="fp16,native,tinygemm")
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    dtype, flush, read_flush = torch.bfloat16, L2Flush(torch.device("cuda"), by="write"), L2Flush(torch.device("cuda"), by="read")
    rows = []
    for k, n in parse_shapes(a.shapes):
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        nn.init.normal_(lin.weight, std=0.02)
        for name in a.backends.split(","):
            layer = registry.get(name).quantize(lin, QuantSpec(group_size=128))
            for m in (int(x) for x in a.batch.split(",")):
                r = {"backend": name, "kernel": layer.kernel, "k": k, "n": n, "m": m,
                     **measure(layer, m, k, dtype, flush, read_flush, a.runs)}
                rows.append(r)
                print(f"{name:9} {k}x{n} M={m:<4} outside {r['outside']:8.2f}  inside {r['inside']:8.2f}  "
                      f"empty graph {r['empty']:6.2f}  outside-inside {r['outside_minus_inside']:6.2f} µs  "
                      f"inside, L2 evicted by reads {r['inside_read_flush']:8.2f} ({r['read_vs_write_flush_pct']:+.1f} %)", flush=True)
    write_atomic(a.out, json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

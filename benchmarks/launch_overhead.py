"""Host cost of one layer call in eager PyTorch, next to its GPU time.

compare times layers inside eager forward passes, where a layer's wall time on the GPU
timeline is max(GPU work, host enqueue time). This separates the two for each backend:
  host_us    perf_counter per call over many calls without synchronising (enqueue cost)
  eager_us   CUDA events around many back-to-back calls / calls (what eager sees)
  graph_us   the same call captured in a CUDA graph and replayed (kernel time alone)

Usage: python3 benchmarks/launch_overhead.py OUT.json   (shapes: Llama-3-8B q_proj and gate_proj)
"""

import json
import sys
import time

import torch

from quantbridge.measure.hardware import device_info
from quantbridge.plugin.backend import get
from quantbridge.plugin.spec import QuantSpec

CALLS = 200


def measure(fn, x) -> dict:
    for _ in range(10):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn(x)
    host = (time.perf_counter() - t0) / CALLS * 1e6
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(CALLS):
        fn(x)
    b.record()
    torch.cuda.synchronize()
    eager = a.elapsed_time(b) / CALLS * 1e3
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x)
        with torch.cuda.graph(g):
            for _ in range(20):
                fn(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    a.record()
    for _ in range(10):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    graph = a.elapsed_time(b) / 200 * 1e3
    return {"host_us": host, "eager_us": eager, "graph_us": graph}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "launch_overhead.json"
    rows = []
    for k, n in ((4096, 4096), (4096, 14336)):
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        for name in ("fp16", "native", "tinygemm", "bnb-nf4"):
            layer = get(name).quantize(lin, QuantSpec(group_size=128))
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                r = {"backend": name, "kernel": layer.kernel, "K": k, "N": n, "M": m, **measure(layer, x)}
                rows.append(r)
                print(f"{name:9s} K={k} N={n} M={m:3d}  host {r['host_us']:7.1f} µs  eager {r['eager_us']:7.1f} µs"
                      f"  graph {r['graph_us']:7.1f} µs", flush=True)
    with open(out, "w") as f:
        json.dump({"device": device_info(torch.device("cuda")), "calls": CALLS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

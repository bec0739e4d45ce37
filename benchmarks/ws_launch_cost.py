"""Host cost of a native layer call by configuration, through each of the ws tile's launch paths.

For each case (a layer K x N at M rows, held to one configuration) and each launch path of the ws
tile (LAUNCHES: "gluon", int4_settings.FAST_LAUNCH off, Gluon's own launch every call; "fast", on, in a
layer whose plan was made with it off, so each call goes through int4_triton._run and the compiled
launcher; "bound", on from the layer's first call, so its plan holds an int4_wgmma.BoundLaunch), after
warm-up:
  host_us    perf_counter per call over CALLS calls without synchronising (what the host spends)
  eager_us   CUDA events around CALLS back-to-back calls, per call (what an eager caller sees)
  graph_us   the call captured in a CUDA graph and replayed (benchmarks/launch_overhead.py measures all three)
  tune_*_us  the tuner's figure for the call under each TUNE_TIMING (kernels/tune_timing.py)
  syncs_per_call, host_profile_top  calls that wait on the GPU (torch's sync debug mode) and the
             functions the host spends CALLS calls in, by their own time (cProfile)
Where host_us exceeds the kernel's time, eager callers and eager timings see the host, not the kernel;
tune_graph_us is the kernel alone. Triton-tile cases (not ws) run the same either way: a baseline.

Usage: python3 benchmarks/ws_launch_cost.py OUT.json [--case K N M BM,BN,BK,SPLIT_K,WARPS,STAGES ...]
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import sys
import warnings

import torch
from launch_overhead import CALLS
from launch_overhead import measure as per_call  # benchmarks/: host, eager and graph time of a call
from profile_decode import _six_ints  # benchmarks/: a configuration given as BM,BN,BK,SPLIT_K,WARPS,STAGES

from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels import tune_timing
from quantbridge.kernels.int4_triton import BoundLinear
from quantbridge.measure.hardware import device_info
from quantbridge.plugin.backend import get
from quantbridge.plugin.spec import QuantSpec

# r10's H100 picks where eager timing found a floor (benchmarks/NOTES.md, sixth session), and a Triton tile
DEFAULT_CASES = (
    (8192, 8192, 64, (64, 128, 128, -128, 12, 4)),
    (8192, 8192, 128, (128, 128, 128, -128, 12, 4)),
    (4096, 4096, 128, (128, 128, 128, -128, 12, 4)),
    (4096, 1024, 512, (128, 128, 128, -128, 12, 4)),
    (8192, 28672, 128, (128, 256, 128, 1, 12, 3)),
    (8192, 8192, 64, (64, 128, 128, 2, 4, 3)),
)


LAUNCHES = ("gluon", "fast", "bound")


def measure(k: int, n: int, m: int, cfg: tuple) -> list[dict]:
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    packed = get("native").quantize(lin, QuantSpec(group_size=128)).packed
    # "gluon" and "fast" share a layer whose plan was made with the fast launch off (not bound)
    unbound, bound = BoundLinear(packed, None, config=cfg), BoundLinear(packed, None, config=cfg)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    rows, outs, default = [], {}, settings.FAST_LAUNCH
    for path in LAUNCHES:
        settings.FAST_LAUNCH = path != "gluon"
        layer = bound if path == "bound" else unbound
        for _ in range(20):
            outs[path] = layer(x)
        plan = layer.plans[m]
        timed = per_call(layer, x)  # host_us, eager_us and graph_us over launch_overhead's CALLS calls
        with warnings.catch_warnings(record=True) as caught:  # a call that waits on the GPU shows here
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                layer(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # torch's one-time notice that the mode is a prototype is not a synchronizing call
        syncs = [str(w.message).splitlines()[0] for w in caught if "prototype feature" not in str(w.message)]
        # where the host's time goes: the functions of CALLS calls by their own time
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(CALLS):
            layer(x)
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
        top = [line.strip() for line in text.getvalue().splitlines() if re.match(r"\s*\d+\s", line)]
        row = {"k": k, "n": n, "m": m, "config": list(cfg), "launch": path, "plan_bound": plan.bound is not None,
               **timed, "syncs_per_call": len(syncs), "sync_messages": syncs[:3], "host_profile_top": top}
        for timing in tune_timing.TIMINGS:
            row[f"tune_{timing}_us"] = 1e3 * tune_timing.time_ms(lambda: layer(x), x.device, timing, 10, 100)
        rows.append(row)
    settings.FAST_LAUNCH = default
    tune_timing.release(x.device)
    same = all(torch.equal(outs[p], outs["gluon"]) for p in LAUNCHES)
    for row in rows:
        row["outputs_equal"] = same
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--case", nargs=4, action="append", metavar=("K", "N", "M", "CONFIG"),
                    help="a layer and the configuration it is held to (repeat); default: the r10 cases")
    a = ap.parse_args()
    cases = [(int(k), int(n), int(m), _six_ints(c)) for k, n, m, c in a.case] if a.case else DEFAULT_CASES
    rows = []
    for k, n, m, cfg in cases:
        for row in measure(k, n, m, cfg):
            rows.append(row)
            print(f"{k}x{n} M={m:<4d} {str(tuple(cfg)):32s} {row['launch']:5s} bound={int(row['plan_bound'])} "
                  f"host {row['host_us']:7.1f} us  eager {row['eager_us']:7.1f}  tuner do_bench "
                  f"{row['tune_do_bench_us']:7.1f} read {row['tune_read_us']:7.1f} graph {row['tune_graph_us']:7.1f}"
                  f"  same output {row['outputs_equal']}  syncs {row['syncs_per_call']} {row['sync_messages'][:1]}",
                  flush=True)
            for line in row["host_profile_top"] if row["launch"] != "gluon" else ():
                print("      " + line)
    text = json.dumps({"device": device_info(torch.device("cuda")), "calls": CALLS, "rows": rows}, indent=1)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    sys.exit(main())

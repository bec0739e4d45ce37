"""Host enqueue cost per eager layer call: F.linear, native (NativeLinear) and tinygemm.

What a plain eager `generate` pays per linear layer on the host: `time.perf_counter_ns`
around one call, no synchronisation inside the timed region (the stream is synchronised
every SYNC_EVERY calls, outside it, so the launch queue never fills). Per layer shape
(K x N) and M: median and p10/p90 over CALLS calls after warm-up, the ratio native/F.linear,
and, for native, where the time goes: a cProfile of the per-call path and the pieces of it
timed one by one. Each backend's failure is recorded with its reason; the others go on.

Usage: python benchmarks/profile_host.py OUT.json [--calls 2000] [--shapes 4096x4096,...] [--m 1,16]
Without CUDA it prints "needs CUDA" and runs a reduced CPU smoke test (small shape, few calls).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from quantbridge.plugin.backend import get
from quantbridge.plugin.spec import QuantSpec

SYNC_EVERY = 64
WARMUP = 50


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_cost(fn, dev: torch.device, calls: int) -> dict:
    """perf_counter_ns around each call of fn(); statistics in µs."""
    for _ in range(WARMUP):
        fn()
    _sync(dev)
    ns = []
    clock = time.perf_counter_ns
    for i in range(calls):
        t0 = clock()
        fn()
        ns.append(clock() - t0)
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            _sync(dev)
    _sync(dev)
    us = sorted(v / 1e3 for v in ns)
    q = statistics.quantiles(us, n=10)
    return {"median_us": statistics.median(us), "p10_us": q[0], "p90_us": q[-1], "min_us": us[0], "calls": calls}


def gpu_cost(fn, dev: torch.device, calls: int = 200) -> float | None:
    """Eager time per call on the GPU timeline (CUDA events around back-to-back calls), µs."""
    if dev.type != "cuda":
        return None
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize(dev)
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    torch.cuda.synchronize(dev)
    return a.elapsed_time(b) / calls * 1e3


def profile_calls(fn, calls: int, top: int = 15) -> tuple[str, list[dict]]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    text = io.StringIO()
    st = pstats.Stats(prof, stream=text).sort_stats("tottime")
    st.print_stats(top)
    rows = []
    for (file, line, name), (_, ncalls, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append({"function": f"{os.path.basename(file)}:{line}({name})", "calls_per_layer_call": ncalls / calls,
                     "tottime_us_per_layer_call": tt / calls * 1e6, "cumtime_us_per_layer_call": ct / calls * 1e6})
    return text.getvalue(), rows


def native_pieces(layer, x: torch.Tensor, dev: torch.device, calls: int) -> dict:
    """The per-call path of NativeLinear, piece by piece (median µs each, same clock)."""
    from quantbridge.kernels import int4_triton as kt
    from quantbridge.kernels._fast_launch import hooks_active

    bound = layer._bound
    pieces: dict[str, object] = {}
    if bound is None:
        return {"note": f"no bound launch on this device (kernel {layer.kernel})"}
    m = x.reshape(-1, x.shape[-1]).shape[0]
    plan = bound.plans.get(m)
    pieces["config"] = None if plan is None else list(plan.cfg)
    pieces["compiled_launcher"] = plan is not None and plan.raw is not None
    n = bound.n
    med = lambda f: host_cost(f, dev, calls)["median_us"]  # noqa: E731
    pieces["module_call_us"] = med(lambda: layer(x))
    pieces["bound_call_us"] = med(lambda: bound(x))
    pieces["torch_empty_out_us"] = med(lambda: torch.empty((m, n), device=bound.device, dtype=bound.dtype))
    pieces["current_stream_us"] = med(lambda: kt._current_raw_stream(bound.device_index))
    pieces["x_checks_us"] = med(lambda: (x.dtype is bound.dtype, x.get_device(), x.shape[-1], x.is_contiguous(),
                                         x.data_ptr()))
    pieces["hooks_active_us"] = med(hooks_active)
    if plan is not None and plan.raw is not None:
        raw, g = plan.raw, plan.grid
        out = torch.empty((m, n), device=bound.device, dtype=bound.dtype)
        stream = kt._current_raw_stream(bound.device_index)
        wsp = kt._workspace(bound.device, stream, plan.ws_numel)[1] if plan.ws_numel else 0
        xp, op = x.data_ptr(), out.data_ptr()

        def launch_only():
            raw.fn(g[0], g[1], g[2], stream, raw.function, raw.coop, raw.pdl, None, None, raw.metadata,
                   None, None, None, xp, bound.qw_ptr, bound.s_ptr, bound.z_ptr, op, wsp, plan.cnt_ptr,
                   bound.b_ptr or op, *plan.tail)

        pieces["compiled_launch_only_us"] = med(launch_only)
    w = layer.packed
    pieces["uncached_int4_linear_us"] = med(lambda: kt.int4_linear(x, w, layer.bias))
    return pieces


def build(name: str, lin: torch.nn.Linear):
    if name == "F.linear":
        w = lin.weight.detach()
        return (lambda x: F.linear(x, w)), "aten.linear (cuBLAS)"
    if name == "nn.Linear":
        return lin, "torch.nn.Linear"
    backend = get(name)
    ok = backend.available(lin.weight.device)
    if not ok.ok:
        raise RuntimeError(ok.reason)
    layer = backend.quantize(lin, QuantSpec(group_size=128))
    return layer, layer.kernel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="profile_host.json")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN (in x out features)")
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--backends", default="F.linear,nn.Linear,native,tinygemm")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        dev, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        calls = args.calls
    else:
        print("needs CUDA: running a reduced CPU smoke test (reference kernel, small shape, few calls)")
        dev, dtype = torch.device("cpu"), torch.float32
        shapes, calls = [(256, 512)], 100
    ms = [int(v) for v in args.m.split(",")]
    backends = args.backends.split(",")

    from quantbridge.measure.hardware import device_info, library_versions

    try:
        info = device_info(dev)
    except Exception as e:  # noqa: BLE001 - telemetry must not stop the measurement
        info = {"error": repr(e)}
    result = {"script": "benchmarks/profile_host.py", "cuda": cuda, "device": info, "versions": library_versions(),
              "calls": calls, "sync_every": SYNC_EVERY, "warmup": WARMUP, "rows": [], "failures": [], "profiles": []}

    torch.manual_seed(0)
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
        torch.nn.init.normal_(lin.weight, std=0.02)
        layers = {}
        for name in backends:
            try:
                layers[name] = build(name, lin)
            except Exception as e:  # noqa: BLE001 - one backend's failure is a row, not the end
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                print(f"{name:10s} K={k} N={n}  FAILED to build: {reason}", flush=True)
                result["failures"].append({"backend": name, "K": k, "N": n, "stage": "build", "reason": reason})
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            base = None
            for name, (fn, kernel) in layers.items():
                try:
                    fn(x)  # first call: tunes/compiles where it must
                    _sync(dev)
                    r = host_cost(lambda: fn(x), dev, calls)
                    r.update(backend=name, kernel=kernel, K=k, N=n, M=m, gpu_eager_us=gpu_cost(lambda: fn(x), dev))
                except Exception as e:  # noqa: BLE001
                    reason = f"{type(e).__name__}: {e}".splitlines()[0]
                    print(f"{name:10s} K={k} N={n} M={m:3d}  FAILED: {reason}", flush=True)
                    result["failures"].append({"backend": name, "K": k, "N": n, "M": m, "stage": "run",
                                               "reason": reason, "traceback": traceback.format_exc()[-2000:]})
                    continue
                if name == "F.linear":
                    base = r["median_us"]
                r["ratio_to_F.linear"] = None if base is None else r["median_us"] / base
                result["rows"].append(r)
                ratio = "" if base is None else f"  x{r['ratio_to_F.linear']:.2f} F.linear"
                gpu = "" if r["gpu_eager_us"] is None else f"  gpu-eager {r['gpu_eager_us']:7.1f}"
                print(f"{name:10s} K={k:5d} N={n:5d} M={m:3d}  host median {r['median_us']:6.1f} µs"
                      f"  p10 {r['p10_us']:6.1f}  p90 {r['p90_us']:6.1f}{gpu}{ratio}", flush=True)
            if "native" in layers and not args.no_profile:
                layer = layers["native"][0]
                try:
                    prof = {"K": k, "N": n, "M": m, "pieces": native_pieces(layer, x, dev, min(calls, 1000))}
                    text, rows = profile_calls(lambda: layer(x), 500)
                    prof["cprofile_top"] = rows
                    result["profiles"].append(prof)
                    print("  native per-call pieces (median µs): "
                          + ", ".join(f"{a}={b:.2f}" if isinstance(b, float) else f"{a}={b}"
                                      for a, b in prof["pieces"].items()), flush=True)
                    print("\n".join(text.splitlines()[:40]), flush=True)
                except Exception as e:  # noqa: BLE001
                    reason = f"{type(e).__name__}: {e}".splitlines()[0]
                    print(f"  native profile FAILED: {reason}", flush=True)
                    result["failures"].append({"backend": "native", "K": k, "N": n, "M": m, "stage": "profile",
                                               "reason": reason, "traceback": traceback.format_exc()[-2000:]})
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    summary = [r for r in result["rows"] if r["backend"] == "native" and r["ratio_to_F.linear"] is not None]
    if summary:
        worst = max(summary, key=lambda r: r["ratio_to_F.linear"])
        print(f"native/F.linear host cost: worst x{worst['ratio_to_F.linear']:.2f} (K={worst['K']} N={worst['N']} "
              f"M={worst['M']}); target <= x1.30", flush=True)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

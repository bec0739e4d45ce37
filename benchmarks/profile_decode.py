"""One decode-shaped call of the native Triton kernel, for Nsight Compute.

  ncu --profile-from-start off --launch-skip 5 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats python3 benchmarks/profile_decode.py

Only the launches after tuning and warm-up are inside the profiler range (cudaProfilerStart), so
with --profile-from-start off ncu never profiles a tuning candidate.

Usage: python3 benchmarks/profile_decode.py [K N M [KERNEL]] [--config BM,BN,BK,SPLIT_K,WARPS,STAGES]
                                           [--fixup-rows R] [--fixup-loads L] [--[no-]fixup-sliced] [--sz-split]
(default: 8192 28672 1, Llama-3-70B gate/up)
KERNEL: a registered kernel (marlin, machete, ...) run on round-to-nearest codes, as bench's rtn+K
rows are; without it, the native backend. ncu's --kernel-name must then match that kernel's name.
--config: the native kernel with this configuration (int4_configs.Config) instead of the tuned one,
to profile a tile the tuner did not keep (its choice moves between tiles that time within 2 %).
--fixup-rows: int4_settings.FIXUP_ROWS for the warp-specialized tiles (how stream-K parts are summed).
--fixup-loads: int4_settings.FIXUP_LOADS (parts whose loads the row-chunk fix-up issues at once).
--[no-]fixup-sliced: int4_settings.FIXUP_SLICED on (a split run's parts summed by all its programs, a slice
each; the default since r11) or off.
--sz-split: int4_settings.SZ_SPLIT (the tiles read split scale and zero-point words, 2.5 bytes a row and group).
"""

import argparse
import sys

import torch
from kernel_variants import _apply  # benchmarks/: sets A/B settings on int4_settings

from quantbridge.plugin.backend import get
from quantbridge.plugin.kernel import build_exactly
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec


def _six_ints(text: str) -> tuple[int, ...]:
    try:
        cfg = tuple(int(v) for v in text.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 6:
        raise argparse.ArgumentTypeError("six integers: BM,BN,BK,SPLIT_K,WARPS,STAGES (int4_configs.Config)")
    return cfg


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="*", help="K N M [KERNEL]")
    ap.add_argument("--config", type=_six_ints, help="BM,BN,BK,SPLIT_K,WARPS,STAGES")
    ap.add_argument("--fixup-rows", type=int, help="int4_settings.FIXUP_ROWS")
    ap.add_argument("--fixup-loads", type=int, help="int4_settings.FIXUP_LOADS")
    ap.add_argument("--fixup-sliced", action=argparse.BooleanOptionalAction,
                    help="int4_settings.FIXUP_SLICED on or off (default: the module's)")
    ap.add_argument("--sz-split", action="store_true", help="int4_settings.SZ_SPLIT")
    a = ap.parse_args(argv)
    if len(a.shape) not in (0, 3, 4) or not all(v.isdigit() for v in a.shape[:3]):
        ap.error("the shape is K N M (integers), then optionally a kernel's name")
    if len(a.shape) == 4 and a.config:
        ap.error("--config sets the native kernel's tile: not with KERNEL")
    return a


def main() -> None:
    a = _args(sys.argv[1:])
    # the kernel settings asked for, set as the A/B variants set theirs
    _apply({key: value for key, value in (("FIXUP_ROWS", a.fixup_rows), ("FIXUP_LOADS", a.fixup_loads),
                                          ("FIXUP_SLICED", a.fixup_sliced),
                                          ("SZ_SPLIT", a.sz_split or None)) if value is not None})
    k, n, m = (int(v) for v in a.shape[:3]) if a.shape else (8192, 28672, 1)
    kernel = a.shape[3] if len(a.shape) == 4 else None
    cfg = a.config
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    spec = QuantSpec(group_size=128)
    if kernel:
        q = build_exactly(kernel, quantize_rtn(lin.weight.detach(), spec, scale_dtype=torch.bfloat16), None)
        label = q.kernel
    else:
        q = get("native").quantize(lin, spec)
        label = q.kernel
        if cfg:
            from quantbridge.kernels.int4_triton import BoundLinear

            label = f"{q.kernel} at {cfg}"
            q = BoundLinear(q.packed, None, config=cfg)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(10)]
    q(xs[0])  # tuning (cached on disk) happens here
    torch.cuda.synchronize()
    for x in xs:  # warm-up: every launch of this M compiled and bound
        q(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for x in xs:
        q(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    # the configuration the native kernel ran (the tuner's pick on this device, or --config), so a
    # profile says which tile it is of: picks differ between devices and tunings
    bound = getattr(q, "_bound", q)
    plan = getattr(bound, "plans", {}).get(m)
    ran = f", configuration {plan.cfg}" if plan is not None else ""
    print(f"ran {kernel or 'native'} K={k} N={n} M={m}, kernel {label}{ran}")


if __name__ == "__main__":
    main()

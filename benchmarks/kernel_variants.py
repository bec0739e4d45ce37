"""A/B timing of native Triton kernel variants on one device, in one process.

Each variant is a setting of kernels/int4_triton.py (`CODE_MODE`: how codes become floats
and how a bound layer lays them out; `SCALES_PACKED`: whether operand tiles read the scales and
zero points packed in one word per row and group; `OPERAND_TILED`: whether a bound layer stores
its operand codes tile-major; `STREAM_K`: whether the tuner also tries stream-K tiles; `WGMMA_WS`:
whether it also tries the warp-specialized Gluon tiles). Every variant is
tuned on its own (the tuner keeps a separate table entry per variant) and timed by the
bench harness: CUDA-graph replay, L2 flushed, a fresh random input per replay, median and
p10/p90 of --runs. Predictions and outcomes go to benchmarks/NOTES.md.

  python3 benchmarks/kernel_variants.py OUT.json --shapes 8192x28672,4096x4096 --batch 1,4,16,64,128
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from quantbridge.measure.probes import L2Flush
from quantbridge.plugin.files import write_atomic
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run import bench
from quantbridge.run.rowspec import Kind, RowSpec

VARIANTS = {mode: {"CODE_MODE": mode, "SCALES_PACKED": True, "OPERAND_TILED": False, "STREAM_K": False}
            for mode in ("i2f", "magic", "inplace", "asm", "prefetch", "async", "xprep", "tiled", "operand")}
# operand tiles reading scales and zero points separately, as up to r4 (kernels/int4_triton.py SCALES_PACKED)
VARIANTS["operand-s16"] = {"CODE_MODE": "operand", "SCALES_PACKED": False, "OPERAND_TILED": False, "STREAM_K": False}
# the operand codes stored tile-major (kernels/int4_triton.py OPERAND_TILED)
VARIANTS["operand-tiled"] = {"CODE_MODE": "operand", "SCALES_PACKED": True, "OPERAND_TILED": True, "STREAM_K": False}
# the tuner also trying stream-K tiles at M >= 64 (kernels/int4_triton.py STREAM_K)
VARIANTS["operand-streamk"] = {"CODE_MODE": "operand", "SCALES_PACKED": True, "OPERAND_TILED": False, "STREAM_K": True}
VARIANTS["operand-tiled-streamk"] = {"CODE_MODE": "operand", "SCALES_PACKED": True, "OPERAND_TILED": True,
                                     "STREAM_K": True}
# + the warp-specialized Gluon tiles at M >= 64 (kernels/int4_wgmma.py, int4_settings.WGMMA_WS)
VARIANTS["operand-tiled-ws"] = {**VARIANTS["operand-tiled-streamk"], "WGMMA_WS": True}
# + its 16-row tiles at M <= 16 (int4_settings.WGMMA_WS_DECODE)
VARIANTS["operand-tiled-ws-decode"] = {**VARIANTS["operand-tiled-ws"], "WGMMA_WS_DECODE": True}
# + the ws tile freeing each stage one step later, beside the next wait (int4_settings.RELEASE_LAG)
VARIANTS["operand-tiled-ws-lag2"] = {**VARIANTS["operand-tiled-ws"], "RELEASE_LAG": 2}
# + the ws tile's stream-K parts stored for the rows of x only, summed 16 rows at a time (int4_settings.FIXUP_ROWS;
# the kernel's default since r9, so "operand-tiled-ws" is now its A/B variant), one part's loads at a time
# (FIXUP_LOADS 1: the kernel's default up to r9, now the A/B variant of "operand-tiled-ws-fixup16-loads4")
VARIANTS["operand-tiled-ws-fixup16"] = {**VARIANTS["operand-tiled-ws"], "FIXUP_ROWS": 16, "FIXUP_LOADS": 1}
# + the scales and zero points in split group-major words, 2.5 bytes a row and group (int4_settings.SZ_SPLIT)
VARIANTS["operand-tiled-ws-sz25"] = {**VARIANTS["operand-tiled-ws"], "SZ_SPLIT": True}
# + the row-chunk fix-up's loads four parts at a time (int4_settings.FIXUP_LOADS 4): the kernel's default since
# r10; r10's own settings, the A/B variant of r11's "-sliced-fast"
VARIANTS["operand-tiled-ws-fixup16-loads4"] = {**VARIANTS["operand-tiled-ws-fixup16"], "FIXUP_LOADS": 4}
# + a split run's parts summed by all of the tile's programs, each a slice of its rows (int4_settings.FIXUP_SLICED)
VARIANTS["operand-tiled-ws-fixup16-loads4-sliced"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4"],
                                                      "FIXUP_SLICED": True}
# + the ws tile's consumer warpgroups as two partitions of one warpgroup each, half the tile's rows each
# (int4_settings.CONSUMER_PARTS 2: barriers of 128 threads, not 256; the (128, 256) and (256, 128) tiles left out)
VARIANTS["operand-tiled-ws-fixup16-loads4-2cons"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4"], "CONSUMER_PARTS": 2}
# + the tuner emptying L2 by a read before each timed candidate, as the bench does (int4_settings.TUNE_TIMING),
# and timing each in CUDA-graph replays, as the bench times a call
VARIANTS["operand-tiled-ws-fixup16-loads4-readflush"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4"],
                                                         "TUNE_TIMING": "read"}
VARIANTS["operand-tiled-ws-fixup16-loads4-graphtimed"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4"],
                                                          "TUNE_TIMING": "graph"}
# + the ws tile launched through its compiled kernel's launcher after the first call (int4_settings.FAST_LAUNCH):
# no Gluon binder per call, so the tuner's eager timings see less host cost; with and without the sliced sum.
# "-sliced-fast" is the kernel's default since r11 (the variant precompile_triton.py compiles without --modes)
VARIANTS["operand-tiled-ws-fixup16-loads4-fast"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4"], "FAST_LAUNCH": True}
VARIANTS["operand-tiled-ws-fixup16-loads4-sliced-fast"] = {**VARIANTS["operand-tiled-ws-fixup16-loads4-sliced"],
                                                           "FAST_LAUNCH": True}
# r11's default + the warp-K decode tiles at M <= 8 (int4_settings.DECODE_WARP_K: each K step split among
# a program's warps, a batched dot summed once after the loop; 8 rows of x, 16 to 64 weight rows a program)
VARIANTS["operand-tiled-ws-fixup16-loads4-sliced-fast-warpk"] = {
    **VARIANTS["operand-tiled-ws-fixup16-loads4-sliced-fast"], "DECODE_WARP_K": True}
# + the ws tile's 16-row decode tiles at M <= 16 (int4_settings.WGMMA_WS_DECODE), the tuner timing every
# candidate in CUDA-graph replays: r6 judged these tiles by eager timing, which put a ws launch's host
# cost (~50-110 us, benchmarks/NOTES.md, sixth session) on kernels of ~50 us. Its A/B is "-graphtimed".
VARIANTS["operand-tiled-ws-fixup16-loads4-decode-graphtimed"] = {
    **VARIANTS["operand-tiled-ws-fixup16-loads4-graphtimed"], "WGMMA_WS_DECODE": True}
# both: the fix-up in row chunks (the default since r8's A/B), one part's loads at a time, with the split words
VARIANTS["operand-tiled-ws-fixup16-sz25"] = {**VARIANTS["operand-tiled-ws-fixup16"], "SZ_SPLIT": True}
for _v in VARIANTS.values():  # the variants before them ran without them
    _v.setdefault("WGMMA_WS", False)
    _v.setdefault("WGMMA_WS_DECODE", False)
    _v.setdefault("RELEASE_LAG", 1)
    _v.setdefault("FIXUP_ROWS", 0)
    _v.setdefault("SZ_SPLIT", False)
    _v.setdefault("FIXUP_LOADS", 1)
    _v.setdefault("FIXUP_SLICED", False)
    _v.setdefault("CONSUMER_PARTS", 1)
    _v.setdefault("FAST_LAUNCH", False)
    _v.setdefault("TUNE_TIMING", "do_bench")
    _v.setdefault("DECODE_WARP_K", False)

# the ws tile's settings (int4_wgmma's launches read them); the rest are the Triton tiles' and the tuner's
WS_SETTINGS = ("RELEASE_LAG", "FIXUP_ROWS", "FIXUP_LOADS", "FIXUP_SLICED", "CONSUMER_PARTS", "FAST_LAUNCH")


def current(key: str):
    """A variant setting's value as int4_settings holds it now (AttributeError: no such setting)."""
    from quantbridge.kernels import int4_settings

    return getattr(int4_settings, key)


def _apply(values: dict) -> None:
    """Set one variant's settings on int4_settings (the layer is built and first called under them)."""
    from quantbridge.kernels import int4_settings

    for key, value in values.items():
        current(key)  # a name the settings do not hold is an error, not a new attribute
        setattr(int4_settings, key, value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shapes", default="8192x28672,4096x4096,4096x14336,14336x4096")
    ap.add_argument("--batch", default="1,4,16,64,128")
    ap.add_argument("--variants", default="i2f,magic,inplace,asm,prefetch")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_variants: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    ms = [int(m) for m in a.batch.split(",")]
    bw = bench.copy_bandwidth(device)["bytes_per_s"]
    flush = L2Flush(device)
    rows = []
    for k, n in bench.parse_shapes(a.shapes):
        for name in a.variants.split(","):
            _apply(VARIANTS[name])
            row = RowSpec(name, Kind.KERNEL, kernel="triton")  # RTN codes through exactly our kernel
            try:
                got = bench.bench_layer(row, k, n, ms, QuantSpec(group_size=128), device, dtype, a.runs, 5, flush, bw)
            except Exception as e:  # a variant that fails to compile or run: the others still get measured
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                got = [bench.Row(name, "", k, n, m, "failed", reason) for m in ms]
                print(f"{k}x{n} {name}: failed: {reason}", flush=True)
            for r in got:
                rows.append(asdict(r) | {"variant": name})
                print(f"{k}x{n} M={r.m:<4} {name:11} {r.status:9} {r.median_us or float('nan'):8.1f} us "
                      f"p10 {r.p10_us or float('nan'):.1f} p90 {r.p90_us or float('nan'):.1f} "
                      f"{r.pct_copy_bw or float('nan'):5.1f}% BW err {r.check_rel_err or float('nan'):.2g}", flush=True)
    from quantbridge.kernels import int4_triton as kt

    configs = {key: cfg for (_, key), cfg in kt.TUNER.memo.items()}
    write_atomic(a.out, json.dumps({"device": torch.cuda.get_device_name(device), "copy_bytes_per_s": bw,
                                    "rows": rows, "configs": configs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

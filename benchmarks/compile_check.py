"""Compile every native tile the tuner could try for sm_90, with no GPU: a pre-flight before a device run.

The interpreter runs no PTX and Gluon has no interpreter, so a kernel change that breaks a tile's
compilation (or makes ptxas serialize a ws tile's wgmma) would first show on the GPU, in device time. This
compiles, on the CPU, each Triton candidate of the given shapes and M buckets (operand codes, and the
"asm" tiles canonical codes run) and every warp-specialized tile (one and two consumer partitions, split
runs summed in slices or not), in bf16 and fp16, and lists what failed.

  python3 benchmarks/compile_check.py                                  # 8192x28672, M = 1 ... 512
  python3 benchmarks/compile_check.py --shapes 4096x4096 --batch 1,16 --no-ws
"""

from __future__ import annotations

import argparse
import itertools
import sys

import sass_counts as sc  # benchmarks/: the sm_90 compiles with a launch's specialization

from quantbridge.kernels import int4_configs as kc
from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels import int4_wgmma as ws

WS_TILES = ((16, 128, 8), (16, 256, 6), (64, 128, 4), (64, 256, 3), (128, 128, 4), (128, 256, 3), (256, 128, 3))


def triton_tiles(shapes: list[tuple[int, int]], ms: list[int]) -> list[tuple[tuple, str]]:
    """(configuration, code mode) of every Triton candidate (warp-K tiles included), as on a 132-SM GPU."""
    sm_count, warp_k = kc._sm_count, settings.DECODE_WARP_K
    kc._sm_count, settings.DECODE_WARP_K = (lambda: 132), True
    try:
        out = set()
        for (k, n), m, layout in itertools.product(shapes, ms, ("operand-tiled", "canonical")):
            for c in kc.candidate_configs(m, n, k, 128, layout):
                if c != kc.DEQUANT_CUBLAS and not kc.is_ws(c) and c[3] >= 0:
                    out.add((c, "operand" if layout != "canonical" else "asm"))
        return sorted(out)
    finally:
        kc._sm_count, settings.DECODE_WARP_K = sm_count, warp_k


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x28672", help="KxN layers (default: 8192x28672)")
    ap.add_argument("--batch", default="1,4,16,64,128,512", help="M buckets")
    ap.add_argument("--no-ws", action="store_true", help="leave the warp-specialized tiles out")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    failed, done = [], 0
    for cfg, mode in triton_tiles(shapes, [int(m) for m in a.batch.split(",")]):
        for dt in ("bf16", "fp16"):
            try:
                sc.compile_sass(cfg, mode, dt)
                done += 1
            except Exception as e:  # any compile error is the finding
                failed.append(f"{cfg} {mode} {dt}: {e!r:.200}")
    print(f"Triton tiles: {done} compiled", flush=True)
    if not a.no_ws and ws.gluon is not None:
        parts = settings.CONSUMER_PARTS
        n_ws = 0
        try:
            for p, cfg, dt, sliced in itertools.product((1, 2), WS_TILES, ("bf16", "fp16"), (False, True)):
                if p == 2 and cfg[0] * cfg[1] > ws.ACC_LIMIT_2P:
                    continue
                settings.CONSUMER_PARTS = p
                try:
                    verdict = sc._ptxas(sc.compile_ws(cfg, dt, sliced=sliced)[1])
                    n_ws += 1
                    if "(C75" in verdict or "serialized" in verdict:
                        failed.append(f"ws {cfg} parts {p} {dt} sliced {sliced}: {verdict}")
                except Exception as e:
                    failed.append(f"ws {cfg} parts {p} {dt} sliced {sliced}: {e!r:.200}")
        finally:
            settings.CONSUMER_PARTS = parts
        print(f"warp-specialized tiles: {n_ws} compiled", flush=True)
    print("\n".join(failed) if failed else "no failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

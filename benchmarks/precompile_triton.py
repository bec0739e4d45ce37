"""Compile every tuning candidate of the native Triton kernel ahead of time, in parallel.

The tuner (kernels/int4_triton.py) compiles each candidate configuration the first time it
times it, one after another: a few hundred compilations at one to two seconds each on the
GPU machine's slow host CPU. Compiling them here first, spread over worker processes, fills
Triton's on-disk cache, so the tuner's own compilations become cache hits.

A compiled kernel is shared by every shape with the same specialization (dtypes, 16-byte
alignment, which integers are 1 or multiples of 16), so one small problem per M bucket
stands for all Llama shapes: M is the bucket itself, N = 1024, K = 4096 (K/g = 32).

  python3 benchmarks/precompile_triton.py --batch 1,4,16,64,128 --dtypes bf16,fp16 --workers 12
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import torch
import torch.multiprocessing as mp
from kernel_variants import VARIANTS, WS_SETTINGS, _apply, current  # the kernel settings each mode stands for

from quantbridge.run.bench import parse_shapes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The operand modes: the codes' layout, whether the tiles read packed scales, and whether the tuner
# also tries stream-K tiles.
OPERAND_MODES = {name: ("operand-tiled" if v["OPERAND_TILED"] else "operand", v["SCALES_PACKED"], v["STREAM_K"])
                 for name, v in VARIANTS.items() if v["CODE_MODE"] == "operand"}


def default_mode() -> str | None:
    """The mode whose settings are the kernel's own (what a bound layer runs), if one is."""
    return next((name for name, v in VARIANTS.items() if all(current(key) == val for key, val in v.items())), None)


def _jobs(shapes: list[tuple[int, int]], ms: list[int], dtypes: list[str], group: int, modes: list[str]) -> list:
    from quantbridge.kernels import int4_configs as kc
    from quantbridge.kernels import int4_settings as settings

    # M only enters the specialization as "is 1" or "a multiple of 16": one M per class.
    jobs: dict[tuple, tuple] = {}
    # each mode's candidates under its own STREAM_K and ws tile settings (CONSUMER_PARTS 2 leaves some
    # tiles out, WGMMA_WS_DECODE adds the 16-row ones, DECODE_WARP_K the warp-K ones), as the worker will
    # launch them, then the settings as they were
    shaping = (*WS_SETTINGS, "WGMMA_WS_DECODE", "DECODE_WARP_K")
    stream_k, saved = settings.STREAM_K, {key: current(key) for key in shaping}
    for m in ms:
        mb = kc.m_bucket(m)
        cls = 1 if mb == 1 else 16 if mb % 16 == 0 else 0
        for k, n in shapes:
            for mode in modes:
                layout = OPERAND_MODES[mode][0] if mode in OPERAND_MODES else "canonical"
                if mode in VARIANTS:
                    _apply({key: VARIANTS[mode][key] for key in shaping})
                settings.STREAM_K = mode in OPERAND_MODES and OPERAND_MODES[mode][2]
                for cfg in kc.candidate_configs(mb, n, k, group, layout):
                    for dt in dtypes:
                        jobs.setdefault((cls, cfg, dt, mode), (mb, cfg, dt, mode))
                _apply(saved)
    settings.STREAM_K = stream_k
    return sorted(jobs.values())


def _worker(rank: int, jobs: list, group: int, counts) -> None:
    from quantbridge.kernels import int4_configs as kc
    from quantbridge.kernels import int4_layouts as lay
    from quantbridge.kernels import int4_settings as settings
    from quantbridge.kernels import int4_triton as kt
    from quantbridge.plugin.packed import quantize_rtn
    from quantbridge.plugin.spec import QuantSpec

    n, k = 1024, 4096
    weights = {dt: quantize_rtn(torch.randn(n, k), QuantSpec(group_size=group), scale_dtype=dtype).to("cuda")
               for dt, dtype in DTYPES.items()}
    # The layouts the tuner times "tiled" and the operand modes on (bound layers keep their codes so).
    laid = {(layout, dt): replace(w, qweight=lay.relayout(w.qweight, "canonical", layout)) for dt, w in weights.items()
            for layout in ("tiled", "operand", "operand-tiled")}
    # what bound operand tiles read, in each packing a mode's settings ask for (SZ_SPLIT)
    packed = {(split, dt): kt.pack_scales_zeros(w, split) for dt, w in weights.items() for split in (False, True)}
    ok = 0
    for i, (mb, cfg, dt, mode) in enumerate(jobs):
        if i % counts[1] != rank:
            continue
        if mode in VARIANTS:
            _apply(VARIANTS[mode])
        settings.CODE_MODE = "operand" if mode in OPERAND_MODES else mode
        dtype, w = DTYPES[dt], weights[dt]
        x = torch.randn(mb, k, device="cuda", dtype=dtype)
        out = torch.empty(mb, n, device="cuda", dtype=dtype)
        try:
            # operand codes through every configuration (dequantize + cuBLAS reads them too); tiled
            # ones through the kernels, with canonical codes for dequantize + cuBLAS
            if mode in OPERAND_MODES:
                layout, reads_packed, _ = OPERAND_MODES[mode]
                kt.launch(x, laid[layout, dt], out, cfg, layout=layout,
                          sz=packed[settings.SZ_SPLIT, dt] if reads_packed else None)
            elif mode == "tiled" and cfg != kc.DEQUANT_CUBLAS:
                kt.launch(x, laid[mode, dt], out, cfg, layout=mode)
            else:
                kt.launch(x, w, out, cfg)
            ok += 1
        except Exception:  # too many registers or too much shared memory: the tuner skips it too
            pass
    torch.cuda.synchronize()
    counts[0][rank] = ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--batch", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--modes", default="", help="code modes to compile (default: the kernel's own); "
                    "kernel_variants.py times i2f,magic,inplace; operand-tiled: the operand codes stored "
                    "tile-major (OPERAND_TILED); operand-s16: operand tiles with scales read apart "
                    "(SCALES_PACKED off); operand-streamk, operand-tiled-streamk: stream-K tiles too (STREAM_K)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("precompile_triton: needs a CUDA GPU", file=sys.stderr)
        return 2
    from quantbridge.kernels import int4_settings as settings

    modes = a.modes.split(",") if a.modes else [default_mode() or settings.CODE_MODE]
    unknown = [m for m in modes if m not in settings.CODE_MODES and m not in OPERAND_MODES]
    if unknown:
        known = ", ".join([*settings.CODE_MODES, *OPERAND_MODES])
        print(f"precompile_triton: no mode {', '.join(unknown)}; modes: {known}", file=sys.stderr)
        return 2
    jobs = _jobs(parse_shapes(a.shapes), [int(m) for m in a.batch.split(",")], a.dtypes.split(","),
                 a.group_size, modes)
    start = time.perf_counter()
    done = mp.Manager().list([0] * a.workers)
    mp.spawn(_worker, args=(jobs, a.group_size, (done, a.workers)), nprocs=a.workers, join=True)
    print(f"precompiled {sum(done)} of {len(jobs)} kernels in {time.perf_counter() - start:.0f} s "
          f"over {a.workers} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

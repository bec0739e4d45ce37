"""Triton INT4 x BF16/FP16 matmul with fused dequantization (weight-only, group-wise).

It reads the canonical Int4Weight directly (uint8 [N, K/2], low nibble = even column):
each K-tile is split into its even and odd columns, so the two nibbles of a byte meet
the even and odd activations in two dots, with no interleave.

Two regimes, one kernel:
  decode  (small M) memory-bound: every weight byte is read once; split-K spreads a layer
          over all SMs; each split writes its fp32 partial to a workspace and the last
          split of a tile to finish (a per-tile counter) sums them: one launch, no memset.
  prefill (large M) tensor cores: large M tiles amortise the dequantization.
The configuration is chosen per (M bucket, N, K, group, dtype) by timing candidates once;
choices are cached on disk so a second run does not retune.

Imported lazily: the package works without Triton.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import torch
import triton

from quantbridge.kernels._fast_launch import FastLauncher, hooks_active, raw_launcher, sm_count
from quantbridge.kernels.int4_kernels import _dequant_kernel, _int4_gemv_kernel, _int4_matmul_kernel, _prep_x_kernel
from quantbridge.kernels.int4_layouts import (OPERAND_LAYOUTS, TILED_LAYOUTS, operand_fits, relayout, split_sz_rows,
                                              sz_format, tileable)
from quantbridge.kernels.tune_timing import check_timing, release, time_ms
from quantbridge.kernels.tuning import pick_fastest
from quantbridge.plugin.files import cache_dir, write_atomic
from quantbridge.plugin.packed import Int4Weight

KERNEL_NAME = "quantbridge.triton"
# Bumped when the kernels change in a way that can move the best configuration: tuned
# choices are kept per revision, so an older table is never applied to a newer kernel.
# r4: the tile kernel's K loop provably runs (its wgmma were serialized by ptxas before).
# r5: the operand tiles' search space grew (at M >= 128 BLOCK_K 128 tiles and a 128x256 stream-K
# tile, at M < 128 BLOCK_K 128 stream-K tiles, at M <= 16 stream-K tiles) and STREAM_K is on.
# r6: at M >= 64 the warp-specialized Gluon tiles (int4_wgmma) are candidates too (WGMMA_WS).
# r7: stream-K tiles write and read their fp32 partials for the rows of x that exist only (M=1 on a
# 16-row tile: 1/16 of the workspace bytes), which makes them cheaper against the GEMV at M < 16.
# r8: the tuner times the candidates within 5 % of the fastest again, in turns (kernels/tuning.py).
# r9: the ws tiles' stream-K parts summed in row chunks (int4_wgmma.FIXUP_ROWS 16), and where a layer
# has fewer ws tiles than half the SMs, stream-K runs that split each tile's K evenly are candidates.
# r10: the ws tiles' row-chunk fix-up issues four parts' loads at once (int4_wgmma.FIXUP_LOADS 4).
# r11: ws tiles launched bound (int4_wgmma.FAST_LAUNCH), so the tuner's eager timings of a ws candidate
# see its kernel, not ~110 us of Gluon's launch; a split run's parts summed by all its programs
# (int4_wgmma.FIXUP_SLICED).
REVISION = "r11"


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a jit function: calling it from the host costs microseconds per call.
    return -(-a // b)


def dequantize(w: Int4Weight, dtype: torch.dtype, layout: str = "canonical") -> torch.Tensor:
    """The dense weight in storage (act-order permuted) column order, computed on the GPU, from
    canonical or operand-layout codes (tile-major or not)."""
    if layout != "canonical" and layout not in OPERAND_LAYOUTS:
        raise ValueError(f"dequantize reads canonical or operand codes, not {layout!r}")
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), device=w.qweight.device, dtype=dtype)
    bk = min(w.group_size, 256)  # groups are 32/64/128 or the whole row (per-channel)
    # Through the fast launcher: at large M every call dequantizes, and Triton's own binder
    # costs more host time than the dequantization takes on the GPU.
    _DEQUANT((_cdiv(n, 64), _cdiv(k, bk), 1), (w.qweight, w.scales, w.zeros, _offsets(w), out),
             (n, k, k // w.group_size), (w.group_size, 64, bk, w.offsets is not None, layout in OPERAND_LAYOUTS,
              layout in TILED_LAYOUTS))
    return out


_DEQUANT = FastLauncher(_dequant_kernel)


def _offsets(w: Int4Weight) -> torch.Tensor:
    """The offsets tensor, or (never read) the zero-points in its place."""
    return w.zeros if w.offsets is None else w.offsets


# How codes become floats, each mode adding to the one before (int4_codes, the kernels'
# docstrings): "i2f" converts (the kernels' first form); "magic" uses the bit trick;
# "inplace" also keeps the GEMV's nibbles in place and drops K masks where K is a multiple
# of the tile; "asm" also dequantizes tensor-core tiles eight codes per word in PTX, zero
# folded in, with W x^T for M <= 16; "prefetch" also loads the GEMV's next tile of words
# while the current one is decoded; "async" instead has Triton pipeline the GEMV's weight
# loads through shared memory, num_stages deep (neither helped on the H100); "xprep" is "asm"
# with the GEMV's activations prepared once per call by a prologue kernel (fp32, nibble-major,
# 16^-p applied), which ncu's M=1 profile pointed to (no gain on the H100); "tiled" is "asm"
# with bound layers' codes stored tile-major (int4_layouts.to_tiled; not yet timed; keeps the
# codes twice); "operand" (the default) keeps bound layers' codes in int4_layouts' operand layout,
# their one stored copy: tensor-core tiles feed the dequantized weight to wgmma from registers,
# the GEMV reads that layout too, and so does the dequantization before cuBLAS.
# On an H100 it took 8192x28672 from 100 to 82 us at M=16 and from 255 to 160 us at M=128
# against "asm" (benchmarks/NOTES.md). All are kept so benchmarks/kernel_variants.py can time
# them on one device; the tuner keeps a table entry per mode. Layers the operand layout does not
# fit (groups below 64, float offsets) run "asm" on canonical codes.
CODE_MODES = {"i2f": 0, "magic": 1, "inplace": 2, "asm": 3, "prefetch": 4, "async": 5, "xprep": 6, "tiled": 7,
              "operand": 8}
CODE_MODE = "operand"
# Bound operand-layout layers keep their scales and zero points packed one int32 per row and
# group too (pack_scales_zeros; 4 bytes per 64 of codes at group 128), which their tensor-core
# tiles read; False reads the two separately, as up to r4 (an A/B variant).
SCALES_PACKED = True
# How they are packed: False, one int32 per row and group, row-major [N, groups] (4 bytes a row and
# group); True ("split"), group-major words [groups/2 + groups/8, N]: two groups' 16-bit scales to
# a word, then eight groups' 4-bit zero points to a word. 2.5 bytes a row and group, as Marlin's,
# against 4 (2.7 MB of 8192x28672's 129.5 MB from DRAM under ncu), and each K step reads BLOCK_N
# contiguous words of each, not one word from each of BLOCK_N rows (benchmarks/NOTES.md). An A/B
# variant until measured.
SZ_SPLIT = False
# Bound operand-layout layers of whole 64x128 tiles store those codes tile-major ("operand-tiled",
# int4_layouts), so a 64x128 tile is one contiguous 4 KB read: on an H100 it took 8192x28672 from
# 66.5 to 60.0 us at M=1 and from 68.9 to 59.1 at M=16 (benchmarks/NOTES.md). False keeps them
# row-major (an A/B variant).
OPERAND_TILED = True
_MAGIC_BITS = 0x4B000000  # 2^23 as fp32 bits: a kernel argument, so it is a register, not an immediate


# Operand tiles may also run stream-K (SPLIT_K = -P: P programs, equal runs of (tile, K-tile)
# steps): the tuner then tries it beside the whole tiles, on one or two programs per SM at M >= 64
# and one to three at M <= 16, and keeps it only where it timed faster. On the H100 it took M=512
# from 439 to 411 us (row-major operand codes); False is the A/B variant without it.
STREAM_K = True

# Operand-tiled layers with packed scales may also run the warp-specialized Hopper tiles of
# int4_wgmma (a producer warp loading by TMA, two warpgroups unpacking into wgmma): the tuner tries
# them at M >= 64 beside the Triton tiles and keeps them only where they timed faster. False is the
# A/B variant without them.
WGMMA_WS = True
# ... and at M <= 16 its 16-row tiles on deep rings too: correct on an H100, and 11-16 % slower there than
# the Triton tiles by kernel time (graph-timed tuning, benchmarks/NOTES.md): the A/B setting, off.
WGMMA_WS_DECODE = False
# At M <= 8 on operand codes the tuner also tries tiles whose warps split each K step among them
# (warp_k: 8 rows of x, a batched dot, one K slice a warp, summed once after the loop; _warp_k_product),
# 16 to 64 weight rows a program over the whole of K (or a half or quarter of it on the small layers),
# so a counter between at most four programs, where the 16-row tiles split K over up to eight. Compiled
# for sm_90 their K loop issues fewer instructions a code than the 16-row wgmma tiles
# (benchmarks/results/sass-warp-k-sm90.txt). Built for the small layers at M <= 4 (tinygemm's shape:
# many warps a program, each on its own K); an A/B setting, off until timed on an H100
# (benchmarks/NOTES.md, eighth session).
DECODE_WARP_K = False
# How the tuner times a candidate (kernels/tune_timing.py): "do_bench" (its L2 flush writes 256 MB,
# so each launch starts among dirty lines), "read" (eager launches after a read flush, as the bench
# flushes) or "graph" (replays of the launch captured in a CUDA graph after a read flush, as the bench
# times a call). At M=1 on 8192x28672 one tuning kept a run 10 % slower in the bench than another
# tuning's on the same H100 (benchmarks/NOTES.md, r10): A/B settings until compared.
TUNE_TIMING = "do_bench"

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); SPLIT_K < 0: stream-K over -SPLIT_K
# programs; num_warps WS_WARPS: int4_wgmma's warp-specialized tile (BLOCK_K 128; SPLIT_K 1 or stream-K)
Config = tuple[int, int, int, int, int, int]


DEQUANT_CUBLAS: Config = (0, 0, 0, 0, 0, 0)  # dequantize with Triton, multiply with cuBLAS


WS_WARPS = 12  # int4_wgmma's launch: two consumer warpgroups and the producer's (one warp of it working)


def warp_k(cfg: Config) -> int:
    """How many K slices a configuration's warps split each step into (1: none). BLOCK_M 8 marks a warp-K
    tile (DECODE_WARP_K; no other tile has 8 rows of x): one K slice a warp, each BLOCK_K / num_warps
    columns, on operand codes only."""
    return cfg[4] if cfg[0] == 8 else 1


def is_ws(cfg: Config) -> bool:
    """Whether a configuration is int4_wgmma's warp-specialized tile (num_warps WS_WARPS)."""
    return cfg[4] == WS_WARPS


def _ws_module():
    """int4_wgmma where its tiles can run here (WGMMA_WS, Gluon, a Hopper GPU), else None."""
    if not WGMMA_WS:
        return None
    from quantbridge.kernels import int4_wgmma

    return int4_wgmma if int4_wgmma.available() else None


def gemv_configs(k: int, group: int) -> list[Config]:
    """CUDA-core GEMV tiles (BLOCK_M = 1 marks them): each K-tile inside one group, K in words."""
    if k % 8:
        return []
    ok = [bk for bk in (64, 128, 256) if bk <= group and group % bk == 0 or group == k and bk <= max(k, 64)]
    return [(1, bn, bk, sk, w, st) for bn in (64, 128, 256) for bk in ok for sk in (1, 4, 8, 16)
            for w, st in ((4, 3), (8, 4)) if _cdiv(k, bk) >= sk]


def candidate_configs(m: int, n: int, k: int, group: int, layout: str = "canonical") -> list[Config]:
    """The search space for one M bucket: kept small, since every candidate is compiled and timed.
    The operand layout runs tiles inside one group only."""
    if layout in OPERAND_LAYOUTS:
        # Tiles whose fp32 accumulator alone takes over 128 registers a thread spill (128x256 at 4
        # warps: 2.4 KB, and ptxas serializes its wgmma; sass_counts.py --ptxas): not candidates.
        tiles = [c for c in _tile_configs(m, n, k, group)
                 if c == DEQUANT_CUBLAS or (c[2] <= group and c[0] * c[1] <= 128 * 32 * c[4])]
        extra = []
        if m >= 64:
            # One warpgroup over 64 weight rows: twice the tiles of BLOCK_N 128, so more SMs busy at
            # M = 64..512; with the wgmma no longer serialized (r4) it need not interleave two groups.
            extra.append((min(m, 128), 64, 64, 1, 4, 3))
        if m >= 128 and group >= 128:
            # Twice the K per step: half the barriers and waits per code, where each of the M=128
            # tile's 128 K steps took ~1 us against ~0.3 us of tensor-core work (benchmarks/NOTES.md).
            extra += [(128, 128, 128, 1, 8, 3), (128, 64, 128, 1, 4, 3)]
        if m >= 256:  # W x^T: M is the tensor-core N dimension, up to 256
            extra += [(256, 128, 64, 1, 8, 3), (256, 64, 64, 1, 4, 3)]
        sms = _sm_count()
        if STREAM_K and sms:
            # Equal runs of steps instead of whole tiles, as (tile, programs per SM) pairs. M <= 16 is
            # memory-bound: every SM streams an equal share of the weight (Marlin's stripes do this),
            # where whole tiles leave a partial last wave. M >= 64 has few tiles per SM (224 of
            # 128x128 at M=128, N=28672: 1.7 per SM); a 128x256 tile reads x half as often (x, not
            # the weight, is most of what a 128x128 tile loads at M=128) at 255 registers, one
            # program per SM (benchmarks/NOTES.md).
            runs = []
            if m <= 16:
                runs.append(((16, 128, 128, 4, 4), (1, 2, 3)))
            if m >= 64:
                runs.append(((min(m, 128), 128, 64, 4, 4), (1, 2)))
            if 64 <= m < 128 and group >= 128:  # the M=64 whole tile's BLOCK_K
                runs.append(((64, 128, 128, 4, 3), (1, 2)))
            if m >= 128:
                runs.append(((128, 256, 64, 8, 3), (1,)))
            if m >= 256:
                runs.append(((256, 128, 64, 8, 3), (1, 2)))
            extra += [(bm, bn, bk, -c * sms, w, st) for (bm, bn, bk, w, st), per_sm in runs for c in per_sm
                      if stream_k_fits(m, n, k, bm, bn, bk, c * sms)]
        # the warp-specialized tiles read tile-major codes (and packed scales: the tuner skips them without)
        ws = _ws_module() if layout == "operand-tiled" else None
        for bm, bn, st in ws.configs(m, n, k, group, decode=WGMMA_WS_DECODE) if ws is not None else ():
            extra.append((bm, bn, ws.TILE_K, 1, WS_WARPS, st))
            count = ws.tiles(m, n, (bm, bn, st))
            # stream-K where whole tiles leave a last wave part-empty
            if STREAM_K and sms and count % sms and stream_k_fits(m, n, k, bm, bn, ws.TILE_K, sms):
                extra.append((bm, bn, ws.TILE_K, -sms, WS_WARPS, st))
            # Fewer tiles than half the SMs (a small layer at large M: 32 tiles of 4096x1024 at
            # M=512): each tile's K in s equal runs on tiles x s programs, so no run crosses a tile and
            # a tile has s parts, where runs over every SM cross tiles and leave two parts a program.
            for s_ in (2, 4, 8, 16) if STREAM_K and sms and 2 * count <= sms else ():
                if (k // ws.TILE_K) % s_ == 0 and sms // 2 <= count * s_ <= 2 * sms and count * s_ != sms:
                    extra.append((bm, bn, ws.TILE_K, -count * s_, WS_WARPS, st))
        if DECODE_WARP_K and m <= 8:
            extra += warp_k_configs(n, k, group, sms)
        at = len(tiles) - (tiles[-1:] == [DEQUANT_CUBLAS])  # dequantize + cuBLAS stays the last candidate
        tiles[at:at] = [c for c in extra if c not in tiles]
        return (gemv_configs(k, group) if m <= 2 else []) + tiles
    if m <= 2:
        return gemv_configs(k, group) + _tile_configs(m, n, k, group)
    return _tile_configs(m, n, k, group)


def warp_k_configs(n: int, k: int, group: int, sms: int | None) -> list[Config]:
    """The warp-K decode tiles (warp_k) for one layer: 8 rows of x and 16, 32 or 64 weight rows a program,
    4 or 8 warps each on slices of 128 columns (64 where the group is 64), over the whole of K or split
    over 2 or 4 programs where the split before left fewer than two programs an SM (sms; none without a
    device): at N=4096, 16-row tiles on 256 or 512 programs, 64-row ones on 64 to 256."""
    sk_cols = 128 if group % 128 == 0 else 64 if group % 64 == 0 else 0
    if not sk_cols:
        return []
    out = []
    for bn in (16, 32, 64):
        for warps in (4, 8):
            for split in (1, 2, 4):
                cfg = (8, bn, warps * sk_cols, split, warps, 3)
                few = sms is not None and _cdiv(n, bn) * (split // 2) < 2 * sms  # the split before: < 2 an SM
                if (split == 1 or few) and k // cfg[2] >= split and splits(k, cfg[2], split):
                    out.append(cfg)
    return out


def _tile_configs(m: int, n: int, k: int, group: int) -> list[Config]:
    if m <= 16:  # memory-bound: one tensor-core row tile, split-K to fill the SMs
        out = [(16, bn, bk, sk, w, st) for bn in (64, 128, 256) for bk in (64, 128) for sk in (1, 2, 4, 8)
               for w, st in ((4, 3), (4, 5), (8, 4))]
    elif m <= 64:
        out = [(bm, bn, bk, sk, 4, 3) for bm in (32, 64) for bn in (64, 128) for bk in (64, 128) for sk in (1, 2)]
    else:
        out = [(bm, bn, 64, 1, w, st) for bm in (64, 128) for bn in (128, 256) for w, st in ((4, 4), (8, 3))]
        if m <= 256:
            # Few output tiles (224 of 128x128 at M=128, N=28672: 1.7 waves on 132 SMs, 11 % occupancy
            # in ncu on the H100): split-K gives every SM work.
            out += [(bm, 128, 64, sk, 8, 3) for bm in (64, 128) for sk in (2, 4)]
    # Prefer tiles inside one group (per-row scales); never more splits than K-tiles.
    in_group = [c for c in out if c[2] <= group] or [c for c in out if c[2] == min(x[2] for x in out)]
    keep = [c for c in in_group if c[2] <= max(k, 64) and k // c[2] >= c[3] and splits(k, c[2], c[3])] \
        or [c for c in in_group if c[3] == 1][:1]
    return keep + ([DEQUANT_CUBLAS] if m >= 128 else [])


def _sm_count() -> int | None:
    """The current CUDA device's SMs (stream-K's program count is per device), None without one."""
    if not torch.cuda.is_available():
        return None
    return sm_count(torch.cuda.current_device())


def stream_k_fits(m: int, n: int, k: int, bm: int, bn: int, bk: int, programs: int) -> bool:
    """Whether stream-K over `programs` can run this shape: every program gets at least one step,
    and the kernel's 32-bit step arithmetic (steps x programs) does not overflow."""
    steps = _cdiv(m, bm) * _cdiv(n, bn) * _cdiv(k, bk)
    return programs <= steps and steps * programs < 2 ** 31


def partials_numel(cfg: Config, m: int, n: int) -> int:
    """fp32 workspace elements a launch's split-K partials take: a slice of the output per split, or
    for stream-K two tiles per program (the run's first and last tile)."""
    bm, bn, _, sk, _, _ = cfg
    return sk * m * n if sk > 1 else 2 * -sk * bm * bn if sk < 0 else 0


def counter_slots(cfg: Config, m: int, n: int) -> int:
    """int32 counters a split launch uses: one per output tile (the GEMV's: per N-tile and row; the
    warp-specialized tile's: per tile and consumer partition, int4_wgmma.CONSUMER_PARTS as it is now)."""
    bm, bn = cfg[0], cfg[1]
    if is_ws(cfg):
        from quantbridge.kernels import int4_wgmma

        return int4_wgmma.counter_count(m, n, (bm, bn, cfg[5]))
    return _cdiv(n, bn) * m if bm == 1 else _cdiv(m, bm) * _cdiv(n, bn)


def splits(k: int, bk: int, sk: int) -> bool:
    """Whether the tile kernel may run split-K `sk` over K: its K loop runs at least once (see its
    comment), which reads past K only where K is a multiple of BLOCK_K (no K mask) and a split has
    no K-tile at all. A ragged K masks every tile, so an empty last split just adds zeros."""
    per = _cdiv(_cdiv(k, bk), sk)
    return k % bk != 0 or (sk - 1) * per < _cdiv(k, bk)


def m_bucket(m: int) -> int:
    """Shapes within a bucket share a configuration: next power of two, capped at 4096."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def _grid(cfg: Config, m: int, n: int) -> tuple[int, int, int]:
    bm, bn, _, sk, _, _ = cfg
    if sk < 0:
        return (-sk, 1, 1)
    return (_cdiv(n, bn), sk, m) if bm == 1 else (_cdiv(m, bm) * _cdiv(n, bn), sk, 1)


def _kernel_args(cfg: Config, w: Int4Weight, m: int, k: int, has_bias: bool, layout: str = "canonical",
                 packed: int = 0) -> tuple[FastLauncher, torch.Tensor, tuple, tuple]:
    """(launcher, the weight view it reads, the integer arguments, the constexprs) of one configuration.
    layout: how w.qweight is laid out (int4_layouts; not canonical only for a bound layer).
    packed: the scales and zero points are read from pack_scales_zeros' words (operand tiles only):
    sz_format's 1 or 2; 0, w's own."""
    bm, bn, bk, sk, _, _ = cfg
    n = w.out_features
    mode = CODE_MODES[CODE_MODE]
    if sk < 0 and (bm == 1 or not stream_k_fits(m, n, k, bm, bn, bk, -sk)):
        raise ValueError(f"{cfg}: stream-K over {-sk} programs needs a tile configuration and at least as many "
                         f"(tile, K-tile) steps as programs for M={m}, N={n}, K={k}")
    if bm != 1 and sk > 0 and not splits(k, bk, sk):
        raise ValueError(f"{cfg}: split-K {sk} over {_cdiv(k, bk)} whole K-tiles leaves a split empty; "
                         f"the tile kernel runs every split at least once")
    if layout in OPERAND_LAYOUTS:
        if mode != 8 or not operand_config(cfg, w.group_size) or w.offsets is not None:
            raise ValueError(f"codes in the operand layout need CODE_MODE 'operand', no float offsets and tiles "
                             f"of 32 or more columns inside one group, not {cfg} in {CODE_MODE!r}")
    elif mode == 8:
        mode = 3  # canonical codes: the "asm" kernels
    if packed and (layout not in OPERAND_LAYOUTS or bm == 1):
        raise ValueError(f"packed scales and zero points are read by operand tiles only, not {cfg} in {layout!r}")
    if mode >= 3 and k % 8:
        mode = 2  # rows that are not whole int32 words: the byte path
    words = bm == 1 or (mode >= 3 and bk <= w.group_size and bm <= 64) or mode == 8  # the kernels' WORD_TILES
    qw = w.qweight.view(torch.int32) if words else w.qweight
    ints = (m, n, k, k // w.group_size, qw.shape[1], _MAGIC_BITS)
    tail = (has_bias, w.offsets is not None, mode, k % bk == 0, not _interpreting())
    if bm == 1:
        return _GEMV, qw, ints, (w.group_size, bn, bk, sk, *tail, cfg[5] if mode == 5 else 1, layout in TILED_LAYOUTS)
    if warp_k(cfg) > 1 and layout not in OPERAND_LAYOUTS:
        raise ValueError(f"{cfg}: a warp-K tile (BLOCK_M 8) reads operand codes only, not {layout!r}")
    return _MATMUL, qw, ints, (w.group_size, bm, bn, bk, sk, bm <= 16, *tail, layout in TILED_LAYOUTS, packed,
                               warp_k(cfg))


def _interpreting() -> bool:
    """Triton's interpreter runs no PTX: the kernels then take inline assembly's plain-op twin."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Split-K partials, one fp32 buffer per (device, stream): kernels on one stream run one after
# another, so every layer can share it; two streams never do. A buffer that is outgrown is
# kept alive: a CUDA graph captured earlier still holds its address.
_WORKSPACES: dict[int, dict[int, tuple[int, int, torch.Tensor]]] = {}
_RETIRED: list[torch.Tensor] = []


try:
    from torch._C import _cuda_getCurrentRawStream as _current_raw_stream  # what Triton itself calls
except ImportError:  # a CPU-only build of torch
    def _current_raw_stream(device_index: int) -> int:
        return torch.cuda.current_stream(device_index).cuda_stream


def _raw_stream(device_index: int) -> int:
    """The current stream's handle; 0 for CPU tensors (the interpreter)."""
    return _current_raw_stream(device_index) if device_index >= 0 else 0


def _workspace(device: torch.device, stream: int, numel: int) -> tuple[int, int, torch.Tensor]:
    """(numel, address, tensor) of the workspace of this device and stream, grown to `numel`."""
    pool = _WORKSPACES.setdefault(device.index if device.type == "cuda" else -1, {})
    entry = pool.get(stream)
    if entry is None or entry[0] < numel:
        if entry is not None:
            _RETIRED.append(entry[2])
            numel = max(numel, 2 * entry[0])
        buf = torch.empty(numel, device=device, dtype=torch.float32)
        entry = pool[stream] = (numel, buf.data_ptr(), buf)
    return entry


def _run(cfg: Config, x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, bias: torch.Tensor | None,
         counters: torch.Tensor | None, stream: int, stride_xm: int | None = None, layout: str = "canonical",
         sz: torch.Tensor | None = None):
    """One launch of a tile configuration; returns the compiled kernel (None in the interpreter).
    sz: w's scales and zero points as pack_scales_zeros gives them, read instead (operand tiles)."""
    m, k = x2.shape
    n = w.out_features
    ws_mod = None
    if is_ws(cfg):
        ws_mod = _ws_module()
        if layout != "operand-tiled" or sz is None or ws_mod is None:
            raise ValueError(f"{cfg} is a warp-specialized Hopper tile: it reads operand-tiled codes with packed "
                             f"scales on an sm_90 GPU (layout {layout!r}, packed scales: {sz is not None})")
        if cfg[3] < 0 and not stream_k_fits(m, n, k, cfg[0], cfg[1], cfg[2], -cfg[3]):
            raise ValueError(f"{cfg}: stream-K over {-cfg[3]} programs needs at least as many (tile, K step) "
                             f"units as programs for M={m}, N={n}, K={k}")
    else:
        fast, qw, ints, constexprs = _kernel_args(cfg, w, m, k, bias is not None, layout,
                                                  sz_format(sz, n, k // w.group_size))
    sx = x2.stride(0) if stride_xm is None else stride_xm
    partials = partials_numel(cfg, m, n)
    if _prepares_x(cfg):
        # The workspace holds the split-K partials, then the prepared activations [M, 8, K/8].
        ws = _workspace(x2.device, stream, partials + m * k)[2]
        xp = ws[partials:partials + m * k]
        _PREP((_cdiv(k // 8, _PREP_BLOCK), m, 1), (x2, xp), (k // 8, sx), (_PREP_BLOCK,), 4, 1)
        x2, sx = xp, k
    elif partials:
        ws = _workspace(x2.device, stream, partials)[2]
    else:
        ws = out  # never read: SPLIT_K = 1 stores straight to out
    if partials and counters is None:
        counters = torch.zeros(counter_slots(cfg, m, n), device=x2.device, dtype=torch.int32)
    if not partials:
        counters = out  # never read
    if ws_mod is not None:
        streamk = cfg[3] < 0
        return ws_mod.launch(x2, w.qweight, sz, out, (cfg[0], cfg[1], cfg[5]), w.group_size, bias,
                             -cfg[3] if streamk else None, ws if streamk else None, counters if streamk else None)
    tensors = (x2, qw, w.scales if sz is None else sz, w.zeros, _offsets(w), out, ws, counters,
               out if bias is None else bias)
    return fast(_grid(cfg, m, n), tensors, (*ints, sx, out.stride(0)), constexprs, cfg[4], cfg[5])


def _prepares_x(cfg: Config) -> bool:
    """Whether this launch runs _prep_x_kernel first ("xprep", GEMV tiles only)."""
    return cfg[0] == 1 and CODE_MODES[CODE_MODE] == 6


def launch(x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, cfg: Config, bias: torch.Tensor | None = None,
           counters: torch.Tensor | None = None, layout: str = "canonical",
           sz: torch.Tensor | None = None) -> torch.Tensor:
    """out = x2 @ W^T (+ bias) for a 2-D x (unit stride along K) with a given configuration.

    counters: for split-K, a zeroed int32 buffer with a slot per output tile, left zeroed
    (allocated here when not given). layout: how w.qweight is laid out (int4_layouts; DEQUANT_CUBLAS
    reads canonical or operand codes). sz: pack_scales_zeros(w), which operand tiles then read
    (the GEMV and DEQUANT_CUBLAS read w's own)."""
    if cfg == DEQUANT_CUBLAS:
        torch.matmul(x2, dequantize(w, x2.dtype, layout).T, out=out)
        if bias is not None:
            out += bias
        return out
    _run(cfg, x2, w, out, bias, counters, _raw_stream(x2.get_device()), layout=layout,
         sz=sz if reads_packed(cfg) else None)
    return out


def reads_packed(cfg: Config) -> bool:
    """Whether a configuration reads packed scales where a layer has them: the tensor-core tiles do;
    the GEMV (BLOCK_M = 1) and DEQUANT_CUBLAS read the canonical ones."""
    return cfg[0] != 1 and cfg != DEQUANT_CUBLAS


def packs_scales(w: Int4Weight, layout: str) -> bool:
    """Whether a bound layer in `layout` keeps pack_scales_zeros(w) for its tiles (SCALES_PACKED; with
    SZ_SPLIT, zero points of 4 bits only)."""
    return SCALES_PACKED and layout in OPERAND_LAYOUTS and w.offsets is None and w.scales.element_size() == 2 \
        and not (SZ_SPLIT and w.zeros.numel() and int(w.zeros.max()) > 15)


def pack_scales_zeros(w: Int4Weight, split: bool | None = None) -> torch.Tensor:
    """The scales' own bits and the zero points, packed for the operand tiles (nothing is rounded).
    Not split: int32 [N, groups], each group's 16-bit scale in the low half, its zero point in bits
    16-23; one 4-byte word per row and group is what an asynchronous copy can stage (a 2-byte scale is
    not). Split (SZ_SPLIT when None): int32 [ceil(groups/2) + ceil(groups/8), N], group-major: word
    (g // 2, n) holds row n's scales of groups g (low half, g even) and g + 1; word (ceil(groups/2) +
    g // 8, n) its zero points of groups g..g+7, 4 bits each, group g % 8 at bit 4 * (g % 8). Groups
    past the last are zero."""
    if w.scales.element_size() != 2 or w.offsets is not None:
        raise ValueError("packing takes 16-bit scales with integer zero points")
    low = w.scales.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    zeros = w.zeros.to(torch.int32)
    if not (SZ_SPLIT if split is None else split):
        return (low | (zeros << 16)).contiguous()
    if zeros.numel() and int(zeros.max()) > 15:
        raise ValueError("split packing holds 4-bit zero points; this weight has zero points above 15")
    n, groups = low.shape
    g2 = -(-groups // 2)
    s = low.new_zeros(2 * g2, n)
    s[:groups] = low.t()
    z = zeros.new_zeros(8 * (split_sz_rows(groups) - g2), n)
    z[:groups] = zeros.t()
    zw = z[0::8]
    for i in range(1, 8):
        zw = zw | (z[i::8] << (4 * i))
    return torch.cat([s[0::2] | (s[1::2] << 16), zw]).contiguous()


_MATMUL = FastLauncher(_int4_matmul_kernel)
_GEMV = FastLauncher(_int4_gemv_kernel)
_PREP = FastLauncher(_prep_x_kernel)
_PREP_BLOCK = 256  # words (2,048 activations) per program


def tuner_key(m: int, n: int, k: int, group: int, dtype: torch.dtype, layout: str, sz_fmt: int, ws=None) -> str:
    """The tuned table's key of one M bucket of a layer: the shape and every module setting that
    changes which candidates run or how they are timed (the ws fast launch changes what eager timing
    adds to them). sz_fmt: sz_format of the scales the tiles read (0 none, 1 [N, G] words, 2 split
    words); ws: int4_wgmma where its tiles are candidates."""
    check_timing(TUNE_TIMING)
    return f"m{m_bucket(m)}-n{n}-k{k}-g{group}-{str(dtype).removeprefix('torch.')}" + f"-{CODE_MODE}" \
        + ("" if layout == "canonical" else f"-{layout}") \
        + ("", "-sz", "-sz25")[sz_fmt] \
        + ("-streamk" if STREAM_K and layout in OPERAND_LAYOUTS else "") \
        + ("-ws" if ws is not None else "") \
        + (f"-lag{ws.RELEASE_LAG}" if ws is not None and ws.RELEASE_LAG != 1 else "") \
        + (f"-fix{ws.FIXUP_ROWS}" if ws is not None and ws.FIXUP_ROWS else "") \
        + (f"-ld{ws.FIXUP_LOADS}" if ws is not None and ws.FIXUP_ROWS and ws.FIXUP_LOADS != 1 else "") \
        + ("-slc" if ws is not None and ws.FIXUP_ROWS and ws.FIXUP_SLICED else "") \
        + ("-cp2" if ws is not None and ws.CONSUMER_PARTS == 2 else "") \
        + ("-fl" if ws is not None and ws.FAST_LAUNCH else "") \
        + ("-wsdecode" if WGMMA_WS_DECODE and m_bucket(m) <= 16 and layout == "operand-tiled" else "") \
        + ("-wk" if DECODE_WARP_K and m_bucket(m) <= 8 and layout in OPERAND_LAYOUTS else "") \
        + {"do_bench": "", "read": "-frd", "graph": "-tgr"}[TUNE_TIMING]


def log_search(key: str, timed: list[tuple[Config, float]], again: dict[Config, list[float]], best: Config) -> None:
    """One JSON line per search appended to $QUANTBRIDGE_TUNE_LOG where it is set (a diagnostic, off by
    default): every candidate's first time, the finalists' times again and the pick, so that a pick
    can be laid beside the bench's times of the same tiles."""
    path = os.environ.get("QUANTBRIDGE_TUNE_LOG")
    if not path:
        return
    line = {"key": key, "timing": TUNE_TIMING, "pick": list(best),
            "first_ms": [[list(c), t] for c, t in sorted(timed, key=lambda ct: ct[1])],
            "again_ms": [[list(c), ts] for c, ts in again.items()]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


class _Tuner:
    """Picks a configuration per shape by timing every candidate once; remembers it on disk."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table: dict[str, list[int]] = {}
        self.path: Path | None = None
        self.memo: dict[tuple[torch.device, str], Config] = {}

    def _file(self, device: torch.device) -> Path:
        name = torch.cuda.get_device_name(device).replace(" ", "_")
        return cache_dir() / f"triton-int4-{REVISION}-{name}-triton{triton.__version__}.json"

    def _load(self, device: torch.device) -> None:
        path = self._file(device)
        if self.path != path:
            self.path = path
            self.table = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def config(self, x2: torch.Tensor, w: Int4Weight, laid: Int4Weight | None = None,
               layout: str = "canonical", sz: torch.Tensor | None = None) -> Config:
        """laid: the same weight in `layout` (int4_layouts), which the candidates then read; w is what
        DEQUANT_CUBLAS reads: canonical codes, or for the operand layout the same operand codes.
        sz: the packed scales and zero points the layer's tiles read (pack_scales_zeros), or None."""
        m, k = x2.shape
        n = w.out_features
        if _interpreting() or not x2.is_cuda:
            # The interpreter checks correctness, not speed: take the first valid candidate.
            return candidate_configs(m_bucket(m), n, k, w.group_size, layout)[0]
        # The layout is in the key where it is not the canonical one: in one mode, a bound layer and an
        # unbound call of the same shape read different layouts (and older tables keep their keys).
        ws = _ws_module() if layout == "operand-tiled" and sz is not None else None
        key = tuner_key(m, n, k, w.group_size, x2.dtype, layout, sz_format(sz, n, k // w.group_size), ws)
        hit = self.memo.get((x2.device, key))
        if hit is not None:  # the per-call path: one dict lookup
            return hit
        with self.lock:
            self._load(x2.device)
            if key not in self.table:
                self.table[key] = list(self._search(x2, w, m_bucket(m), laid, layout, sz, key))
                self._save()
            self.memo[(x2.device, key)] = tuple(self.table[key])
            return self.memo[(x2.device, key)]  # type: ignore[return-value]

    @staticmethod
    def _search(x2: torch.Tensor, w: Int4Weight, mb: int, laid: Int4Weight | None = None,
                layout: str = "canonical", sz: torch.Tensor | None = None, key: str = "") -> Config:
        m, k = x2.shape
        xb = torch.randn((mb, k), device=x2.device, dtype=x2.dtype)
        out = torch.empty((mb, w.out_features), device=x2.device, dtype=x2.dtype)
        timed: list[tuple[Config, float]] = []
        runs = {}
        for cfg in candidate_configs(mb, w.out_features, k, w.group_size, layout):
            if is_ws(cfg) and (sz is None or laid is None):
                continue  # the warp-specialized tiles read packed scales
            # Zeroed once: split-K launches leave their tile counters zeroed again.
            cnt = None if cfg == DEQUANT_CUBLAS else torch.zeros(
                counter_slots(cfg, mb, w.out_features), device=x2.device, dtype=torch.int32)
            try:
                if laid is not None and is_ws(cfg):
                    run = _ws_candidate(cfg, xb, laid, out, cnt, sz)
                elif laid is not None and cfg != DEQUANT_CUBLAS:
                    def run(cfg=cfg, cnt=cnt):
                        return launch(xb, laid, out, cfg, counters=cnt, layout=layout, sz=sz)
                else:  # w: canonical codes, or for the operand layout the same operand codes
                    def run(cfg=cfg, cnt=cnt):
                        return launch(xb, w, out, cfg, counters=cnt, layout=dequant_layout(layout))
                t = time_ms(run, x2.device, TUNE_TIMING, warmup=2, rep_ms=8)
            except (triton.runtime.errors.OutOfResources, RuntimeError, triton.compiler.errors.CompilationError):
                continue  # too much shared memory or registers for this tile: not a candidate
            timed.append((cfg, t))
            runs[cfg] = run
        if not timed:
            raise RuntimeError(f"no Triton configuration runs for M={mb}, N={w.out_features}, K={k}")
        # the front of the field timed again in turns (kernels/tuning.py): one pass's order moves
        best, again = pick_fastest(timed, lambda c: time_ms(runs[c], x2.device, TUNE_TIMING, warmup=1, rep_ms=4))
        release(x2.device)
        log_search(key, timed, again, best)
        return best


TUNER = _Tuner()


def _bind_ws(kernel, cfg: Config, x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, bias: torch.Tensor | None,
             counters: torch.Tensor | None, stream: int, sz: torch.Tensor):
    """int4_wgmma.bind for the launch of a ws configuration that _run just made with these arguments
    (`kernel`, what it returned): an int4_wgmma.BoundLaunch, or None where the launch does not bind."""
    streamk = cfg[3] < 0
    ws = _workspace(x2.device, stream, partials_numel(cfg, x2.shape[0], w.out_features))[2] if streamk else None
    return _ws_module().bind(kernel, x2, w.qweight, sz, out, (cfg[0], cfg[1], cfg[5]), w.group_size, bias,
                             -cfg[3] if streamk else None, ws, counters if streamk else None)


def _ws_candidate(cfg: Config, x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, counters: torch.Tensor,
                  sz: torch.Tensor):
    """A warp-specialized candidate's launch as the tuner times it: the first through _run (compiling
    it; an error there is the candidate's), then, where the fast launch binds it (FAST_LAUNCH), as a
    bound layer launches it (int4_wgmma.BoundLaunch). Through _run each call pays 73-126 us of host
    on an H100 whatever the kernel, which eager timings then report in its place (benchmarks/NOTES.md,
    seventh session); a bound launch pays 12-19."""
    m, k = x2.shape
    streamk = cfg[3] < 0
    numel = partials_numel(cfg, m, w.out_features)
    stream = _raw_stream(x2.get_device())
    kernel = _run(cfg, x2, w, out, None, counters, stream, k, "operand-tiled", sz)
    bound = _bind_ws(kernel, cfg, x2, w, out, None, counters, stream, sz)
    if bound is None:
        def run():
            return _run(cfg, x2, w, out, None, counters, _raw_stream(x2.get_device()), k, "operand-tiled", sz)
        return run
    index, xp, op = x2.get_device(), x2.data_ptr(), out.data_ptr()

    def run_bound():
        s = _current_raw_stream(index)  # the tuner's graph timing captures on a stream of its own
        bound(xp, op, _workspace(x2.device, s, numel)[1] if streamk else 0, s)
    return run_bound


def _check(x: torch.Tensor, w: Int4Weight) -> None:
    if x.shape[-1] != w.in_features:
        raise ValueError(f"activations have {x.shape[-1]} features but the layer takes {w.in_features}")
    if w.scales.dtype != x.dtype:
        raise TypeError(f"scales are {w.scales.dtype} but activations are {x.dtype}; quantize with the compute dtype")


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the Triton kernel; x is [..., K] in fp16 or bf16 (fp32 in the interpreter).

    Everything is derived on each call; a layer that is called many times uses BoundLinear."""
    _check(x, w)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty((x2.shape[0], w.out_features), device=x2.device, dtype=x2.dtype)
    if x2.shape[0]:
        launch(x2, w, out, config or TUNER.config(x2, w), bias)
    elif bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], w.out_features)


def operand_config(cfg: Config, group: int) -> bool:
    """Whether a configuration can read the operand layout: tiles of whole chunks inside one group."""
    if cfg == DEQUANT_CUBLAS:
        return True
    sl = warp_k(cfg)
    bk = cfg[2] // sl  # a warp-K tile's slice: inside one group, so the groups cut between slices
    return bk <= group and bk % 32 == 0 and (sl == 1 or (group % bk == 0 and cfg[2] % sl == 0))


def dequant_layout(layout: str) -> str:
    """The codes dequantize + cuBLAS reads for a bound layer in `layout`: operand codes as they are
    (tile-major or not), tiled ones from the canonical copy that A/B mode keeps."""
    return layout if layout in OPERAND_LAYOUTS else "canonical"


def bound_layout(w: Int4Weight, config: Config | None = None) -> str:
    """The layout a layer bound now keeps its codes in for the kernels (int4_layouts). Weights with
    float offsets (GGUF) and fixed configurations the layout does not fit keep the canonical one."""
    n, k = w.out_features, w.in_features
    if CODE_MODE == "tiled" and tileable(n, k):
        return "tiled"
    if (CODE_MODE == "operand" and operand_fits(k, w.group_size) and w.offsets is None
            and (config is None or operand_config(config, w.group_size))):
        return "operand-tiled" if OPERAND_TILED and tileable(n, k) else "operand"
    return "canonical"


class _Plan:
    """One layer's launch for one M: everything but x, out and the workspace address. raw: a
    Triton tile's C launcher; bound: a ws tile's (int4_wgmma.BoundLaunch); neither: through _run."""

    __slots__ = ("cfg", "grid", "tail", "ws_numel", "counters", "cnt_ptr", "raw", "s_ptr", "bound")

    def __init__(self, cfg: Config, grid, tail, ws_numel, counters, raw, s_ptr: int, bound=None) -> None:
        self.cfg, self.grid, self.tail, self.ws_numel, self.counters, self.raw = cfg, grid, tail, ws_numel, counters, raw
        self.cnt_ptr = counters.data_ptr() if counters is not None else 0
        self.s_ptr = s_ptr  # the scales this launch reads: the layer's own, or their packed words
        self.bound = bound


class BoundLinear:
    """A layer's Triton launches resolved once per M: the per-call path of NativeLinear.

    The weight, its addresses, the configuration, grid, constexprs and the compiled kernel
    are fixed per (layer, M); a call checks x, allocates `out`, reads the current stream
    and calls the compiled launcher with every pointer as an integer. Split-K sums its
    partials inside the one launch (a per-tile counter per plan, zeroed once and left
    zeroed by every launch) in a workspace shared by all layers on one stream.

    CUDA graphs: nothing on the per-call path synchronises or reads the device. A plan made
    while a graph is being captured (an M first seen there) is used by that graph only: its
    counters are zeroed by a memset captured into the graph, not before, so later eager calls
    make their own. Plans are made on the first call per M, which tunes that M bucket if it
    was never tuned on this machine: warm up every M before capturing (as vLLM does).
    """

    MAX_PLANS = 256  # distinct M values kept per layer (prefill lengths vary); others take the uncached path

    def __init__(self, w: Int4Weight, bias: torch.Tensor | None = None, config: Config | None = None,
                 layout: str | None = None) -> None:
        """config: use this configuration for every M instead of the tuned one (tests, benchmarks).
        layout: how w.qweight is laid out already (int4_layouts; what bound_layout chose for it, as
        NativeLinear stores it); None: canonical codes, re-laid here into a copy as bound_layout says."""
        if w.smoothed:
            raise ValueError("BoundLinear takes a plain Int4Weight (fold the smoothing factors first)")
        if layout is None:
            layout = bound_layout(w, config)
            w = replace(w, qweight=relayout(w.qweight, "canonical", layout))
        self.layout = layout
        self.weight = w  # the codes every kernel path reads, in self.layout: one copy
        # dequantize + cuBLAS reads operand codes as they are; the "tiled" A/B mode keeps a
        # canonical copy for it (the codes twice: not a default).
        self._dq_w = replace(w, qweight=relayout(w.qweight, "tiled", "canonical")) if layout == "tiled" else w
        self._dq_layout = dequant_layout(layout)
        self.config = config
        self.bias = None if bias is None else bias.detach().contiguous()
        self.perm = w.perm
        self.n, self.k = w.out_features, w.in_features
        self.dtype = w.scales.dtype
        self.device = w.qweight.device
        self.device_index = w.qweight.get_device()
        for t in (w.qweight, w.scales, w.zeros, _offsets(w)):
            if not t.is_contiguous():
                raise ValueError("BoundLinear needs contiguous qweight, scales, zeros and offsets")
        self.qw_ptr = w.qweight.data_ptr()
        self.s_ptr, self.z_ptr = w.scales.data_ptr(), w.zeros.data_ptr()
        # the tiles' scales and zero points, packed (the GEMV and DEQUANT_CUBLAS read w's own)
        self._sz = pack_scales_zeros(w) if packs_scales(w, layout) else None
        self.m_ptr = _offsets(w).data_ptr()
        self.b_ptr = self.bias.data_ptr() if self.bias is not None else 0
        self.plans: dict[int, _Plan] = {}
        self._captured: list[_Plan] = []  # plans a CUDA graph holds; never used again here
        self._ws = _WORKSPACES.setdefault(self.device_index, {})

    def weights_changed(self) -> None:
        """The stored weight was overwritten in place (a state dict loaded into the same buffers):
        re-derive what was made from it, in place too, so plans and CUDA graphs that hold its
        address read the new values."""
        if self._sz is not None:
            self._sz.copy_(pack_scales_zeros(self.weight))
        if self._dq_w is not self.weight:
            self._dq_w.qweight.copy_(relayout(self.weight.qweight, "tiled", "canonical"))

    def _tile_sz(self, cfg: Config) -> torch.Tensor | None:
        """The packed scales and zero points a configuration reads (reads_packed), or None."""
        return self._sz if reads_packed(cfg) else None

    def canonical(self) -> Int4Weight:
        """The weight with canonical codes (a conversion, for the rare paths that need them)."""
        return replace(self.weight, qweight=relayout(self.weight.qweight, self.layout, "canonical"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not self.dtype or x.get_device() != self.device_index or x.shape[-1] != self.k:
            return int4_linear(x, self.canonical(), self.bias)  # raises the error that names the mismatch
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        xp = x2.data_ptr()
        if xp & 15:  # the kernels are compiled for 16-byte aligned activations
            x2 = x2.clone()
            xp = x2.data_ptr()
        m = x2.shape[0]
        out = torch.empty((m, self.n), device=self.device, dtype=self.dtype)
        plan = self.plans.get(m)
        if plan is not None and (plan.raw is not None or plan.bound is not None) and not hooks_active():
            stream = _current_raw_stream(self.device_index)
            if plan.ws_numel:
                ws = self._ws.get(stream)
                if ws is None or ws[0] < plan.ws_numel:
                    ws = _workspace(self.device, stream, plan.ws_numel)
                wsp = ws[1]
            else:
                wsp = 0
            op = out.data_ptr()
            raw = plan.raw
            if raw is None:
                plan.bound(xp, op, wsp, stream)
            else:
                g = plan.grid
                raw.fn(g[0], g[1], g[2], stream, raw.function, raw.coop, raw.pdl, None, None, raw.metadata,
                       None, None, None, xp, self.qw_ptr, plan.s_ptr, self.z_ptr, self.m_ptr, op, wsp, plan.cnt_ptr,
                       self.b_ptr or op, *plan.tail)
        elif m:
            self._slow(x2, out, plan)
        elif self.bias is not None:
            out += self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.n)

    def _slow(self, x2: torch.Tensor, out: torch.Tensor, plan: _Plan | None) -> None:
        """First call for this M (tune, compile, bind), the interpreter, cuBLAS configs, launch hooks."""
        m = x2.shape[0]
        stream = _raw_stream(self.device_index)
        if plan is not None:
            if plan.cfg == DEQUANT_CUBLAS:
                launch(x2, self._dq_w, out, plan.cfg, self.bias, layout=self._dq_layout)
            else:
                _run(plan.cfg, x2, self.weight, out, self.bias, plan.counters, stream, self.k, self.layout,
                     self._tile_sz(plan.cfg))
            return
        cfg = self.config or TUNER.config(x2, self._dq_w, self.weight if self.layout != "canonical" else None,
                                          self.layout, self._sz)
        if cfg == DEQUANT_CUBLAS:
            launch(x2, self._dq_w, out, cfg, self.bias, layout=self._dq_layout)
            plan = _Plan(cfg, None, None, 0, None, None, self.s_ptr)
        else:
            ws_numel = partials_numel(cfg, m, self.n)
            counters = torch.zeros(counter_slots(cfg, m, self.n), device=x2.device, dtype=torch.int32) \
                if ws_numel else None
            sz = self._tile_sz(cfg)
            s_ptr = self.s_ptr if sz is None else sz.data_ptr()
            # stride_xm is K: x2 is contiguous (for M = 1 its stride never multiplies a nonzero row)
            kernel = _run(cfg, x2, self.weight, out, self.bias, counters, stream, self.k, self.layout, sz)
            if is_ws(cfg):
                # bound where the fast launch is on (x's TMA descriptor encoded per call, the rest once);
                # otherwise each call goes through _run and Gluon's own launch path
                bound = _bind_ws(kernel, cfg, x2, self.weight, out, self.bias, counters, stream, sz)
                plan = _Plan(cfg, None, None, ws_numel, counters, None, s_ptr, bound)
            elif _prepares_x(cfg):
                # two launches ("xprep"): the plan keeps the configuration, and each call goes through _run
                plan = _Plan(cfg, None, None, ws_numel, counters, None, s_ptr)
            else:
                groups = self.k // self.weight.group_size
                _, _, ints, constexprs = _kernel_args(cfg, self.weight, m, self.k, self.bias is not None,
                                                      self.layout, sz_format(sz, self.n, groups))
                plan = _Plan(cfg, _grid(cfg, m, self.n), (*ints, self.k, self.n, *constexprs), ws_numel, counters,
                             raw_launcher(kernel), s_ptr)
        if x2.is_cuda and torch.cuda.is_current_stream_capturing():
            self._captured.append(plan)
        elif len(self.plans) < self.MAX_PLANS:
            self.plans[m] = plan

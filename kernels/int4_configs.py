"""The native kernel's configurations: what a launch is, and which ones the tuner tries.

A configuration is a tuple (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) naming one tile of
int4_kernels (or int4_wgmma's Hopper tile, or dequantize + cuBLAS); candidate_configs gives the search
space of one M bucket, as the settings (int4_settings) open or close parts of it. Nothing here launches.
"""

from __future__ import annotations

import torch

from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels._fast_launch import sm_count
from quantbridge.kernels.int4_layouts import OPERAND_LAYOUTS


def cdiv(a: int, b: int) -> int:
    # triton.cdiv is a jit function: calling it from the host costs microseconds per call.
    return -(-a // b)


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


def ws_module():
    """int4_wgmma where its tiles can run here (WGMMA_WS, Gluon, a Hopper GPU), else None."""
    if not settings.WGMMA_WS:
        return None
    from quantbridge.kernels import int4_wgmma

    return int4_wgmma if int4_wgmma.available() else None


def gemv_configs(k: int, group: int) -> list[Config]:
    """CUDA-core GEMV tiles (BLOCK_M = 1 marks them): each K-tile inside one group, K in words."""
    if k % 8:
        return []
    ok = [bk for bk in (64, 128, 256) if bk <= group and group % bk == 0 or group == k and bk <= max(k, 64)]
    return [(1, bn, bk, sk, w, st) for bn in (64, 128, 256) for bk in ok for sk in (1, 4, 8, 16)
            for w, st in ((4, 3), (8, 4)) if cdiv(k, bk) >= sk]


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
        if settings.STREAM_K and sms:
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
        ws = ws_module() if layout == "operand-tiled" else None
        for bm, bn, st in ws.configs(m, n, k, group, decode=settings.WGMMA_WS_DECODE) if ws is not None else ():
            extra.append((bm, bn, ws.TILE_K, 1, WS_WARPS, st))
            count = ws.tiles(m, n, (bm, bn, st))
            # stream-K where whole tiles leave a last wave part-empty
            if settings.STREAM_K and sms and count % sms and stream_k_fits(m, n, k, bm, bn, ws.TILE_K, sms):
                extra.append((bm, bn, ws.TILE_K, -sms, WS_WARPS, st))
            # Fewer tiles than half the SMs (a small layer at large M: 32 tiles of 4096x1024 at
            # M=512): each tile's K in s equal runs on tiles x s programs, so no run crosses a tile and
            # a tile has s parts, where runs over every SM cross tiles and leave two parts a program.
            for s_ in (2, 4, 8, 16) if settings.STREAM_K and sms and 2 * count <= sms else ():
                if (k // ws.TILE_K) % s_ == 0 and sms // 2 <= count * s_ <= 2 * sms and count * s_ != sms:
                    extra.append((bm, bn, ws.TILE_K, -count * s_, WS_WARPS, st))
        if settings.DECODE_WARP_K and m <= 8:
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
                few = sms is not None and cdiv(n, bn) * (split // 2) < 2 * sms  # the split before: < 2 an SM
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
    steps = cdiv(m, bm) * cdiv(n, bn) * cdiv(k, bk)
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
    return cdiv(n, bn) * m if bm == 1 else cdiv(m, bm) * cdiv(n, bn)


def splits(k: int, bk: int, sk: int) -> bool:
    """Whether the tile kernel may run split-K `sk` over K: its K loop runs at least once (see its
    comment), which reads past K only where K is a multiple of BLOCK_K (no K mask) and a split has
    no K-tile at all. A ragged K masks every tile, so an empty last split just adds zeros."""
    per = cdiv(cdiv(k, bk), sk)
    return k % bk != 0 or (sk - 1) * per < cdiv(k, bk)


def m_bucket(m: int) -> int:
    """Shapes within a bucket share a configuration: next power of two, capped at 4096."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def operand_config(cfg: Config, group: int) -> bool:
    """Whether a configuration can read the operand layout: tiles of whole chunks inside one group."""
    if cfg == DEQUANT_CUBLAS:
        return True
    sl = warp_k(cfg)
    bk = cfg[2] // sl  # a warp-K tile's slice: inside one group, so the groups cut between slices
    return bk <= group and bk % 32 == 0 and (sl == 1 or (group % bk == 0 and cfg[2] % sl == 0))

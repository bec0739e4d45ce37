"""Hopper INT4 tile with warp specialization (Gluon): one warp loads, two warpgroups compute.

The Triton operand tiles (int4_triton, MODE 8) give one warpgroup all of a step in turn: wait for
the copies, unpack the codes, scale them, issue the wgmma, issue the next copies. On the H100 at
M=128 a step took ~1900 cycles against 512 of tensor-core work (benchmarks/NOTES.md). Here the
steps are split by role, as Machete's are: a producer warp issues TMA loads of x and of the codes
into a STAGES-deep ring of shared memory (mbarriers say when a stage is full and when it is free),
and the consumer warpgroups only unpack, scale and issue wgmma, with the weight as the register
operand (W x^T: N is the tensor-core M dimension, M its N), 32 columns of K at a time so the next
chunk is unpacked while the last one's wgmma runs.

It reads what a bound layer in the "operand-tiled" layout already holds: the codes tile-major,
64 rows x 128 columns (16 int32 words) per 4 KB tile, in the operand permutation, so a thread's
word is already the eight values its wgmma registers take (int4_layouts); and the scales and zero
points packed one int32 per row and group, or split into group-major words of two scales and of eight
zero points (int4_triton.pack_scales_zeros). Groups of 128 or a
multiple; N a multiple of BLOCK_N; K a multiple of 128.

Gluon has no interpreter: the numeric tests are GPU tests; without a GPU the kernel is compiled
for sm_90 and its SASS checked (tests/test_int4_wgmma.py).
"""

from __future__ import annotations

import functools

import torch

from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels._fast_launch import run_compiled, sm_count, tma_launcher
from quantbridge.kernels.int4_codes import ASM_BF16_SCALED, ASM_FP16_SCALED, NEG_MAGIC_BF16, NEG_MAGIC_FP16
from quantbridge.kernels.int4_layouts import sz_format

try:  # Gluon ships with Triton 3.5+; without it the tuner offers none of these tiles
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_init, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the Triton installed
    gluon = None

TILE_ROWS, TILE_K = 64, 128  # the operand-tiled layout's tile: 64 rows x 128 columns (16 words)

# (BLOCK_M, BLOCK_N, STAGES): M rows of x per tile (the wgmma N dimension: 16, 64, 128 or 256),
# weight rows per tile (two consumer warpgroups: 128 or 256), ring depth. Shared memory per stage:
# BLOCK_M x 128 x 2 bytes of x + BLOCK_N x 64 bytes of codes (227 KB available on an H100).
WsConfig = tuple[int, int, int]


def available() -> bool:
    """Whether this Triton has Gluon and the current device is a Hopper GPU (sm_90). The tuner's key
    asks on every unbound call: the device's answer is kept."""
    return gluon is not None and torch.cuda.is_available() and _capability_major(torch.cuda.current_device()) == 9


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def fits(n: int, k: int, group: int, block_n: int = 128) -> bool:
    """Whether a weight of this shape can run these tiles (whole tiles, groups of whole steps)."""
    return n % block_n == 0 and n % TILE_ROWS == 0 and k % TILE_K == 0 and group % TILE_K == 0


def smem_bytes(cfg: WsConfig) -> int:
    """Shared memory a tile takes: the ring (x and codes per stage, two mbarriers each) and 8 KB the
    compiler adds (the epilogue's transpose reuses the ring: 172,100 bytes for (128, 128, 4) when
    compiled for sm_90; with two consumer partitions 4 KB less: 168,008)."""
    bm, bn, stages = cfg
    return stages * (bm * TILE_K * 2 + bn * TILE_K // 2 + 16) + 8 * 1024


def counter_count(m: int, n: int, cfg: WsConfig) -> int:
    """int32 counters a stream-K launch uses: one per output tile and consumer partition (CONSUMER_PARTS)."""
    return tiles(m, n, cfg) * settings.CONSUMER_PARTS


# wgmma groups a consumer leaves in flight before it unpacks the next chunk (one group per 32-column
# chunk, four per step): at most 3, since the registers it writes were read by the group four back
# (0 serializes them: the diagnostic in benchmarks/wgmma_check.py)
IN_FLIGHT = 3

# With two partitions every warp keeps the launch's 168 registers (65,536 over 12 warps: no setmaxnreg,
# see _int4_ws_kernel), which holds a consumer warpgroup's 64 accumulator floats a thread but not 128:
# the (128, 256) and (256, 128) tiles then serialize their wgmma (ptxas C7511/C7512), and configs() leaves
# them out (ACC_LIMIT_2P). (64, 256) fits with a word or two of its K step spilled (four weight rows' scales a
# thread); the others spill nothing in their K loops.
ACC_LIMIT_2P = 64 * 256  # BLOCK_M x BLOCK_N at most with CONSUMER_PARTS 2: 64 floats a consumer thread

SMEM_LIMIT = 227 * 1024  # an H100's shared memory per block


def configs(m: int, n: int, k: int, group: int, decode: bool = True) -> list[WsConfig]:
    """The tiles the tuner tries for an M bucket. BLOCK_M follows M up to 256 (the wgmma N limit);
    BLOCK_N 256 reads x half as often per weight row (x is most of a 128 x 128 step's bytes at
    M = 128). At M <= 16 the weight stream is all that matters: 16-row tiles with deep rings (8 and 6
    stages of 8 and 16 KB of codes; decode=False leaves them out); between 16 and 64 the Triton tiles alone.
    With two consumer partitions (CONSUMER_PARTS) only tiles of at most ACC_LIMIT_2P outputs."""
    if m <= 16:
        tiles = [(16, 128, 8), (16, 256, 6)] if decode else []
    elif m < 64:
        return []
    else:
        bm = min(m, 128)
        tiles = [(bm, 128, 4), (bm, 256, 3)] + ([(256, 128, 3)] if m >= 256 else [])
    return [c for c in tiles if fits(n, k, group, c[1]) and smem_bytes(c) <= SMEM_LIMIT
            and (settings.CONSUMER_PARTS == 1 or c[0] * c[1] <= ACC_LIMIT_2P)]


if gluon is not None:

    @gluon.constexpr_function
    def _words_layout(rows, num_warps):
        # A [rows, 4] block of words (one 32-column chunk), held as the wgmma register operand wants
        # it after unpacking: lane % 4 picks the word (columns 2l..), lane / 4 the row, the second
        # register the row + 8, warps 16 rows apart, then whole repeats of 16 x num_warps rows.
        per = 16 * num_warps
        return gl.DistributedLinearLayout(
            reg_bases=[[8, 0]] + [[per << j, 0] for j in range((rows // per).bit_length() - 1)],
            lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16 << j, 0] for j in range(num_warps.bit_length() - 1)], block_bases=[], shape=[rows, 4])

    @gluon.constexpr_function
    def _fix_layout(cols, num_warps):
        # ROWS x cols floats of a row-chunk fix-up: four columns a thread, a warp across 128 columns
        # (fewer columns: more rows a warp)
        lanes = min(32, cols // 4)
        return gl.BlockedLayout([1, 4], [32 // lanes, lanes], [num_warps, 1], [1, 0])

    @gluon.jit
    def _pair16(v):
        """A 16-bit pattern per row [R] (int32) as both halves of an int32."""
        v = v & 0xFFFF
        return v | (v << 16)

    @gluon.jit
    def _unpack_chunk(words, bias2, scale2, ASM: gl.constexpr, DT: gl.constexpr):
        """Words [R, 4] of one 32-column chunk (operand layout) -> (q - z) * s as DT [R, 32], in the
        wgmma register operand's order (int4_codes.dequant_operand does the same in Triton)."""
        zero = gl.zeros_like(words)
        args = [words, gl.expand_dims(bias2, 1) + zero, gl.expand_dims(scale2, 1) + zero]
        if DT == gl.float16:
            q0, q1, q2, q3, q4, q5, q6, q7 = gl.inline_asm_elementwise(
                ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args, dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = gl.inline_asm_elementwise(
                ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args, dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
        R: gl.constexpr = words.shape[0]
        q = gl.join(gl.join(gl.join(q0, q1), gl.join(q2, q3)), gl.join(gl.join(q4, q5), gl.join(q6, q7)))
        q = gl.permute(gl.reshape(q, (R, 1, 4, 2, 2, 2)), (0, 1, 3, 4, 2, 5))
        return gl.reshape(q, (R, 32))

    @gluon.jit
    def _load_sz(s_ptr, rows, g, N, NGROUPS, SPLIT: gl.constexpr):
        """Rows' scale (low 16 bits) and zero point (bits 16-23) of group g as one int32 each, from
        pack_scales_zeros' [N, groups] words or (SPLIT) its group-major split words."""
        if SPLIT:
            v = gl.load(s_ptr + (g // 2) * N + rows)
            z = gl.load(s_ptr + ((NGROUPS + 1) // 2 + g // 8) * N + rows)
            return ((v >> ((g % 2) * 16)) & 0xFFFF) | (((z >> ((g % 8) * 4)) & 0xF) << 16)
        else:
            return gl.load(s_ptr + rows * NGROUPS + g)

    @gluon.jit
    def _run_of(pid, units, P):
        """Program pid's run of (tile, K step) units: [u0, u1), equal shares, tile-major."""
        return pid * units // P, (pid + 1) * units // P

    @gluon.jit
    def _producer(x_desc, q_desc, x_bufs, q_bufs, ready, empty, num_n, k_tiles, units, P,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        u0, u1 = _run_of(gl.program_id(0), units, P)
        for j in range(u1 - u0):
            u = u0 + j
            tile = u // k_tiles
            kt = u % k_tiles
            st = j % STAGES
            mbarrier.wait(empty.index(st), ((j // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            # the consumers read the stage's codes through the generic proxy (ldmatrix), the TMA
            # writes through the async one: order the two
            fence_async_shared()
            bar = ready.index(st)
            mbarrier.expect(bar, x_desc.block_type.nbytes + (BLOCK_N // 64) * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [(tile // num_n) * BLOCK_M, kt * 128], bar, x_bufs.index(st))
            band0 = (tile % num_n) * (BLOCK_N // 64)
            for b in gl.static_range(BLOCK_N // 64):
                # tile (band, kt) of the tile-major codes: rows (band * k_tiles + kt) * 64 of the [*, 16] view
                tma.async_copy_global_to_shared(q_desc, [((band0 + b) * k_tiles + kt) * 64, 0], bar,
                                                q_bufs.index(st).slice(64 * b, 64, dim=0))

    @gluon.jit
    def _store_out(acc, out_ptr, b_ptr, m0, n0, M, stride_om, HAS_BIAS: gl.constexpr, DT: gl.constexpr,
                   num_warps: gl.constexpr):
        """The fp32 tile acc [BLOCK_N, BLOCK_M] (+ bias) into out [M, N] rows m0.., columns n0.., in DT."""
        BLOCK_N: gl.constexpr = acc.shape[0]
        BLOCK_M: gl.constexpr = acc.shape[1]
        out_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        # [BLOCK_M, BLOCK_N], N contiguous, through shared memory in DT (the fp32 tile would not fit beside the ring)
        y = gl.convert_layout(gl.permute(acc.to(DT), (1, 0)), out_l)
        om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_l))
        on = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_l))
        if HAS_BIAS:
            y = (y.to(gl.float32) + gl.expand_dims(gl.load(b_ptr + on).to(gl.float32), 0)).to(DT)
        gl.store(out_ptr + gl.expand_dims(om, 1) * stride_om + gl.expand_dims(on, 0), y,
                 mask=gl.expand_dims(om < M, 1))

    @gluon.jit
    def _fixup_rows(ws_ptr, out_ptr, b_ptr, m0, n0, M, stride_om, t0, p_lo, p_hi, units, P, c0, c_step,
                    HAS_BIAS: gl.constexpr, DT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                    ROWS: gl.constexpr, LOADS: gl.constexpr, COL0: gl.constexpr, COLS: gl.constexpr,
                    num_warps: gl.constexpr):
        """A stream-K tile's parts (x-row-major: slot [BLOCK_M, BLOCK_N]) summed in program order, so the
        sum does not depend on arrival order, and stored (+ bias) ROWS rows of x at a time: the chunks
        c0, c0 + c_step, ... (all of them: 0, 1), of the tile's columns COL0 .. COL0 + COLS (a consumer
        partition's half, or all of them)."""
        fix_l: gl.constexpr = _fix_layout(COLS, num_warps)
        r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, fix_l))
        on = gl.arange(0, COLS, layout=gl.SliceLayout(0, fix_l))
        if COL0 != 0:  # (0: the kernel as it was before there were partitions, to the instruction)
            on = on + COL0
        if HAS_BIAS:
            bias = gl.expand_dims(gl.load(b_ptr + n0 + on).to(gl.float32), 0)
        for c in range(c0, gl.cdiv(gl.minimum(M - m0, BLOCK_M), ROWS), c_step):  # chunks holding a row of x
            rows = c * ROWS + r
            keep = gl.expand_dims(m0 + rows < M, 1)
            local = gl.expand_dims(rows, 1) * BLOCK_N + gl.expand_dims(on, 0)
            part = gl.zeros([ROWS, COLS], gl.float32, fix_l)
            for q0 in range(p_lo, p_hi + 1, LOADS):
                for i in gl.static_range(LOADS):  # straight-line: the LOADS loads go out before the adds
                    q = q0 + i
                    q_slot = 2 * q + (q * units // P < t0).to(gl.int32)  # the tile is q's first, or its last
                    # .cg: from L2, where the other programs wrote (ptxas takes no eviction hint beside it)
                    part += gl.load(ws_ptr + q_slot * (BLOCK_M * BLOCK_N) + local, mask=keep & (q <= p_hi),
                                    other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                part += bias
            gl.store(out_ptr + gl.expand_dims(m0 + rows, 1) * stride_om + n0 + gl.expand_dims(on, 0), part.to(DT),
                     mask=keep)

    @gluon.jit
    def _consumer(x_bufs, q_bufs, ready, empty, s_ptr, out_ptr, b_ptr, ws_ptr, cnt_ptr, M, N, NGROUPS, GROUP_TILES,
                  num_n, k_tiles, units, P, stride_om, HAS_BIAS: gl.constexpr, ASM: gl.constexpr, TWO_E: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, IN_FLIGHT: gl.constexpr,
                  LAG: gl.constexpr, FIXUP: gl.constexpr, LOADS: gl.constexpr, SPLIT: gl.constexpr,
                  SLICED: gl.constexpr, PARTS: gl.constexpr, H: gl.constexpr, num_warps: gl.constexpr):
        """Consumer partition H of PARTS (num_warps warps): the tile's weight rows H * ROWS_H .. of each
        stage, its own accumulator [ROWS_H, BLOCK_M], the output's columns n0 + H * ROWS_H .."""
        DT: gl.constexpr = x_bufs.dtype
        # -(2^e + z) in DT is z ORed into -2^e's bits (int4_codes.neg_magic_zero: integer work only)
        if TWO_E == 1024.0:
            NEG_MAGIC: gl.constexpr = NEG_MAGIC_FP16
        else:
            NEG_MAGIC: gl.constexpr = NEG_MAGIC_BF16
        ROWS_H: gl.constexpr = BLOCK_N // PARTS
        COL0: gl.constexpr = H * ROWS_H  # (PARTS 1: every offset by it is left out, as is every other change)
        acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
        words_l: gl.constexpr = _words_layout(ROWS_H, num_warps)
        pid = gl.program_id(0)
        u0, u1 = _run_of(pid, units, P)
        first = u0 // k_tiles
        j = 0  # this program's steps so far: the ring's position
        for tile in range(first, (u1 - 1) // k_tiles + 1):
            t0 = tile * k_tiles
            ks = gl.maximum(u0, t0) - t0
            ke = gl.minimum(u1, t0 + k_tiles) - t0
            m0 = (tile // num_n) * BLOCK_M
            n0 = (tile % num_n) * BLOCK_N
            # A K loop that may run zero times leaves a path where the zeroed accumulator meets the
            # last wait, and ptxas then serializes every wgmma (C7515); a run holds >= 1 step of each tile.
            gl.assume(ke > ks)
            # an accumulator token from the start: the loop carries what its last wgmma returns
            acc = warpgroup_mma_init(gl.zeros([ROWS_H, BLOCK_M], gl.float32, acc_l))
            n_h = n0  # this partition's first weight row (output column)
            if COL0 != 0:
                n_h = n0 + COL0
            rows = n_h + gl.arange(0, ROWS_H, layout=gl.SliceLayout(1, words_l))
            sz_next = _load_sz(s_ptr, rows, ks // GROUP_TILES, N, NGROUPS, SPLIT)
            for kt in range(ks, ke):
                st = j % STAGES
                # this step's scales were loaded during the last one; the next step's are issued now
                sz = sz_next
                sz_next = _load_sz(s_ptr, rows, gl.minimum(kt + 1, ke - 1) // GROUP_TILES, N, NGROUPS, SPLIT)
                scale2 = _pair16(sz)
                bias2 = _pair16(((sz >> 16) & 0xFF) | NEG_MAGIC)
                if LAG == 2:  # the stage two steps back: the last step's fourth wait saw its groups done
                    mbarrier.arrive(empty.index((j + STAGES - 2) % STAGES), pred=kt > ks + 1)
                mbarrier.wait(ready.index(st), (j // STAGES) & 1)
                qb = q_bufs.index(st)
                if PARTS > 1:  # this partition's rows of the stage's codes
                    qb = qb.slice(COL0, ROWS_H, dim=0)
                xb = x_bufs.index(st).permute((1, 0))  # x^T [128, BLOCK_M]: K-major, as wgmma reads it
                for c in gl.static_range(4):
                    # A wgmma reads its register operand while it runs, not when issued: the group that
                    # last read this chunk's registers (four groups back, the last step's chunk c) must
                    # be done before they are written again. Waiting here, not once a step, keeps the
                    # other three in flight.
                    acc = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))
                    if LAG == 1:
                        if c == 3:  # the last step's four groups are done: free its stage
                            mbarrier.arrive(empty.index((j + STAGES - 1) % STAGES), pred=kt > ks)
                    w = _unpack_chunk(qb.slice(4 * c, 4, dim=1).load(words_l), bias2, scale2, ASM, DT)
                    acc = warpgroup_mma(gl.convert_layout(w, a_l, assert_trivial=True),
                                        xb.slice(32 * c, 32, dim=0), acc, is_async=True)
                j += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            if LAG == 2:  # the tile's last two stages (one, where the tile's run was one step)
                mbarrier.arrive(empty.index((j + STAGES - 2) % STAGES), pred=ke - ks > 1)
            mbarrier.arrive(empty.index((j + STAGES - 1) % STAGES))  # the tile's last stage
            if (ks == 0) & (ke == k_tiles):
                _store_out(acc, out_ptr, b_ptr, m0, n_h, M, stride_om, HAS_BIAS, DT, num_warps)
            else:
                # Stream-K, as the Triton tiles do it: each run's part of a shared tile in its own
                # workspace slot (two per program: its first tile and its last); the last of the
                # tile's programs to arrive sums them in program order and stores the tile. With two
                # consumer partitions, each writes its rows (columns of out) of the same slot and has a
                # counter of its own (tile * PARTS + H): each half's last arriver sums that half.
                slot = 2 * pid + (tile != first).to(gl.int32)
                acc_n = gl.arange(0, ROWS_H, layout=gl.SliceLayout(1, acc_l))
                if COL0 != 0:
                    acc_n = acc_n + COL0
                acc_n = gl.expand_dims(acc_n, 1)
                acc_m = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l)), 0)
                if FIXUP == 0:
                    local = acc_n * BLOCK_M + acc_m
                    gl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + local, acc)
                else:
                    gl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + acc_m * BLOCK_N + acc_n, acc, mask=m0 + acc_m < M,
                             eviction_policy="evict_last")
                p_lo = ((t0 + 1) * P + units - 1) // units - 1  # the owners of the tile's first and last step
                p_hi = ((t0 + k_tiles) * P + units - 1) // units - 1
                # every thread's part is stored before the (single) release below: a barrier of this
                # partition's threads (a named barrier of 128 with two partitions: test_int4_wgmma)
                gl.thread_barrier()
                cnt = cnt_ptr + tile
                if PARTS > 1:
                    cnt = cnt_ptr + (tile * PARTS + H)
                arrived = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if SLICED:
                    # a split run (the host checked: one tile a program, every program resident): all
                    # the tile's programs sum, each its share of the row chunks, once every part is in.
                    # Per half with two consumer partitions: each waits on its half's counter and sums
                    # its columns (both halves of a program are resident together).
                    runs = p_hi - p_lo + 1
                    while arrived < runs:
                        arrived = gl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
                    _fixup_rows(ws_ptr, out_ptr, b_ptr, m0, n0, M, stride_om, t0, p_lo, p_hi, units, P, pid - p_lo,
                                runs, HAS_BIAS, DT, BLOCK_N, BLOCK_M, FIXUP, LOADS, COL0, ROWS_H, num_warps)
                    # the last to finish zeroes the counter for the next launch: every program has
                    # passed its wait by then (each counts once more only after it)
                    if gl.atomic_add(cnt, 1, sem="relaxed", scope="gpu") == 2 * runs - 1:
                        gl.atomic_xchg(cnt, 0)
                elif arrived == p_hi - p_lo:
                    if FIXUP == 0:
                        total = gl.zeros([ROWS_H, BLOCK_M], gl.float32, acc_l)
                        for q in range(p_lo, p_hi + 1):  # in program order: the sum does not depend on arrival order
                            q_slot = 2 * q + (q * units // P < t0).to(gl.int32)  # the tile is q's first, or its last
                            total += gl.load(ws_ptr + q_slot * (BLOCK_M * BLOCK_N) + local, cache_modifier=".cg")
                        _store_out(total, out_ptr, b_ptr, m0, n_h, M, stride_om, HAS_BIAS, DT, num_warps)
                    else:
                        _fixup_rows(ws_ptr, out_ptr, b_ptr, m0, n0, M, stride_om, t0, p_lo, p_hi, units, P, 0, 1,
                                    HAS_BIAS, DT, BLOCK_N, BLOCK_M, FIXUP, LOADS, COL0, ROWS_H, num_warps)
                    gl.atomic_xchg(cnt, 0)  # zero again for the next launch

    @gluon.jit
    def _int4_ws_kernel(x_desc, q_desc, s_ptr, out_ptr, b_ptr, ws_ptr, cnt_ptr, M, N, NGROUPS, GROUP_TILES,
                        stride_om, P, HAS_BIAS: gl.constexpr, ASM: gl.constexpr, TWO_E: gl.constexpr,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IN_FLIGHT: gl.constexpr, LAG: gl.constexpr,
                        FIXUP: gl.constexpr, LOADS: gl.constexpr, SPLIT: gl.constexpr, SLICED: gl.constexpr,
                        PARTS: gl.constexpr, num_warps: gl.constexpr):
        """P programs, each an equal run of the (output tile, K step) units, tile-major (whole tiles
        when P is the number of tiles: then nothing is shared and the workspace is never touched).
        num_warps: a consumer partition's warps (8 with PARTS 1, 4 with 2: CONSUMER_PARTS)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        num_n = N // BLOCK_N  # consecutive tiles share x's rows and read different weights
        k_tiles = x_desc.shape[1] // 128
        units = gl.cdiv(M, BLOCK_M) * num_n * k_tiles
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        q_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 16], q_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=PARTS)  # each consumer partition frees the stage
        if PARTS == 1:
            gl.warp_specialize([
                (_consumer, (x_bufs, q_bufs, ready, empty, s_ptr, out_ptr, b_ptr, ws_ptr, cnt_ptr, M, N, NGROUPS,
                             GROUP_TILES, num_n, k_tiles, units, P, stride_om, HAS_BIAS, ASM, TWO_E, BLOCK_N, BLOCK_M,
                             STAGES, IN_FLIGHT, LAG, FIXUP, LOADS, SPLIT, SLICED, PARTS, 0, num_warps)),
                (_producer, (x_desc, q_desc, x_bufs, q_bufs, ready, empty, num_n, k_tiles, units, P, BLOCK_N,
                             STAGES)),
            ], [1], [40])
        else:
            # Two consumer warpgroups as two partitions: rows 0 .. BLOCK_N / 2 and BLOCK_N / 2 .. of each
            # tile. Register requests beyond the pool (12 warps at 168 each: 2 x 256 > 3 x 168), so that
            # Triton's reallocation gives up, emits no setmaxnreg and every warp keeps 168: Triton puts a worker
            # partition's setmaxnreg in the loop its warps branch from, and ptxas then serializes that
            # partition's wgmma (C7512, "insufficient register resources") whatever the count (120 to 256
            # tried); without it the (64-float) consumers take 147 registers (benchmarks/sass_counts.py).
            gl.warp_specialize([
                (_consumer, (x_bufs, q_bufs, ready, empty, s_ptr, out_ptr, b_ptr, ws_ptr, cnt_ptr, M, N, NGROUPS,
                             GROUP_TILES, num_n, k_tiles, units, P, stride_om, HAS_BIAS, ASM, TWO_E, BLOCK_N, BLOCK_M,
                             STAGES, IN_FLIGHT, LAG, FIXUP, LOADS, SPLIT, SLICED, PARTS, 0, num_warps)),
                (_consumer, (x_bufs, q_bufs, ready, empty, s_ptr, out_ptr, b_ptr, ws_ptr, cnt_ptr, M, N, NGROUPS,
                             GROUP_TILES, num_n, k_tiles, units, P, stride_om, HAS_BIAS, ASM, TWO_E, BLOCK_N, BLOCK_M,
                             STAGES, IN_FLIGHT, LAG, FIXUP, LOADS, SPLIT, SLICED, PARTS, 1, num_warps)),
                (_producer, (x_desc, q_desc, x_bufs, q_bufs, ready, empty, num_n, k_tiles, units, P, BLOCK_N,
                             STAGES)),
            ], [num_warps, 1], [256, 256])


_GL_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=None)
def _smem_layout(shape: tuple[int, int], dtype_name: str):
    return gl.NVMMASharedLayout.get_default_for(list(shape), getattr(gl, dtype_name))


def descriptors(x2: torch.Tensor, codes: torch.Tensor, cfg: WsConfig):
    """TMA descriptors of x [M, K] (BLOCK_M x 128 boxes) and of the tile-major codes viewed as int32
    rows of 16 words (64 x 16 boxes: one 4 KB tile). Host-side objects: the launch encodes them."""
    bm = cfg[0]
    x_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [bm, TILE_K],
                              _smem_layout((bm, TILE_K), _GL_DTYPE[x2.dtype]))
    q = codes.view(torch.int32).view(-1, 16)
    q_desc = TensorDescriptor(q, list(q.shape), [16, 1], [TILE_ROWS, 16], _smem_layout((TILE_ROWS, 16), "int32"))
    return x_desc, q_desc


def tiles(m: int, n: int, cfg: WsConfig) -> int:
    """Output tiles of one launch."""
    return -(-m // cfg[0]) * (n // cfg[1])


def sums_sliced(m: int, n: int, k: int, cfg: WsConfig, programs: int | None, sms: int) -> bool:
    """Whether a launch sums its stream-K parts in slices (FIXUP_SLICED): a split run, i.e. a
    multiple s >= 2 of the tiles in programs (each program's run then lies in one tile: program
    a*s + b runs steps floor(b*K/s) .. floor((b+1)*K/s) of tile a), no more runs a tile than K steps,
    at least two row chunks to share, and no more programs than SMs (a cooperative launch's bound)."""
    if not (settings.FIXUP_SLICED and settings.FIXUP_ROWS and programs):
        return False
    t = tiles(m, n, cfg)
    s = programs // t
    chunks = -(-min(m, cfg[0]) // settings.FIXUP_ROWS)
    return programs % t == 0 and 2 <= s <= k // TILE_K and chunks >= 2 and programs <= sms


# Launches after the first of each specialization call the compiled launcher directly (FAST_LAUNCH,
# int4_settings says why): the compiled kernels by launch_key.
_COMPILED: dict[tuple, object] = {}
# the kernel's constexpr parameters, in its signature's order (num_warps last)
_CONSTEXPRS = ("HAS_BIAS", "ASM", "TWO_E", "BLOCK_N", "STAGES", "IN_FLIGHT", "LAG", "FIXUP", "LOADS", "SPLIT",
               "SLICED", "PARTS", "num_warps")


def launch_key(device_index: int, dtype: torch.dtype, block_m: int, consts: tuple, ptrs: tuple,
               ints: tuple) -> tuple:
    """What selects one compiled ws kernel: its constexprs, the TMA descriptors' types (dtype and
    box, the box fixed by BLOCK_M) and Triton's default specialization of the other arguments
    (pointers by element type and 16-byte alignment: a whole-tile launch passes `out` where stream-K
    passes its fp32 workspace; integers by equal to 1, a multiple of 16, 32 bits or more)."""
    return (device_index, dtype, block_m, consts, tuple((t.dtype, t.data_ptr() & 15 == 0) for t in ptrs),
            tuple((i == 1, i & 15 == 0, i >= 2**31) for i in ints))


def _arguments(x2: torch.Tensor, sz: torch.Tensor, out: torch.Tensor, cfg: WsConfig, group: int,
               bias: torch.Tensor | None, programs: int | None, ws: torch.Tensor | None,
               counters: torch.Tensor | None) -> tuple[int, tuple, tuple, bool]:
    """(programs, integer arguments, constexprs, sliced) of one launch, its inputs checked."""
    m, k = x2.shape
    n = out.shape[1]
    bm, bn, stages = cfg
    if x2.dtype not in _GL_DTYPE or not fits(n, k, group, bn) or sz.dtype != torch.int32:
        raise ValueError(f"the warp-specialized tile {cfg} takes fp16/bf16 x, N a multiple of {bn}, K of 128, "
                         f"groups of 128 or a multiple and packed int32 scales; got {x2.dtype}, N={n}, K={k}, "
                         f"group {group}, scales {sz.dtype}")
    p = tiles(m, n, cfg) if programs is None else programs
    parts = settings.CONSUMER_PARTS
    if parts not in (1, 2) or (parts == 2 and bm * bn > ACC_LIMIT_2P):
        raise ValueError(f"CONSUMER_PARTS is 1 or 2 (not {parts}), and with 2 a tile holds at most "
                         f"{ACC_LIMIT_2P} outputs (64 accumulator floats a consumer thread); got {cfg}")
    if programs is not None and (ws is None or counters is None or ws.numel() < 2 * p * bm * bn
                                 or counters.numel() < counter_count(m, n, cfg)):
        raise ValueError(f"stream-K over {p} programs needs a workspace of {2 * p * bm * bn} floats and "
                         f"{counter_count(m, n, cfg)} zeroed counters ({parts} a tile: CONSUMER_PARTS)")
    split = sz_format(sz, n, k // group) == 2
    sliced = sums_sliced(m, n, k, cfg, programs, sm_count(x2.device.index))
    fp16 = x2.dtype == torch.float16
    ints = (m, n, k // group, group // TILE_K, out.stride(0), p)
    consts = (bias is not None, (ASM_FP16_SCALED if fp16 else ASM_BF16_SCALED).value, 1024.0 if fp16 else 128.0, bn,
              stages, IN_FLIGHT, settings.RELEASE_LAG, settings.FIXUP_ROWS, settings.FIXUP_LOADS, split, sliced, parts,
              8 // parts)
    return p, ints, consts, sliced


def launch(x2: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, out: torch.Tensor, cfg: WsConfig,
           group: int, bias: torch.Tensor | None = None, programs: int | None = None,
           ws: torch.Tensor | None = None, counters: torch.Tensor | None = None):
    """out = x2 @ W^T (+ bias). codes: uint8 [N, K/2] in the "operand-tiled" layout; sz: int32
    [N, K/group] or split (pack_scales_zeros); x2 [M, K] contiguous, fp16 or bf16. programs: stream-K over that
    many programs (None: one whole tile each), with ws (fp32, 2 x programs x BLOCK_M x BLOCK_N) and
    counters (int32, zeroed, left zeroed: counter_count, one per tile and consumer partition). Returns the
    compiled kernel."""
    p, ints, consts, sliced = _arguments(x2, sz, out, cfg, group, bias, programs, ws, counters)
    descs = descriptors(x2, codes, cfg)
    ptrs = (sz, out, out if bias is None else bias, out if ws is None else ws, sz if counters is None else counters)
    key = launch_key(x2.device.index, x2.dtype, cfg[0], consts, ptrs, ints) if settings.FAST_LAUNCH else None
    kernel = _COMPILED.get(key) if settings.FAST_LAUNCH else None
    if kernel is None:
        kernel = _int4_ws_kernel[(p,)](
            *descs, *ptrs, *ints, **dict(zip(_CONSTEXPRS, consts)),
            launch_cooperative_grid=sliced)  # the sliced sum's programs wait on each other: all resident
        if settings.FAST_LAUNCH and kernel is not None:
            _COMPILED[key] = kernel
        return kernel
    # The compiled kernel's own launcher encodes the two TMA descriptors (a driver call each) and
    # launches; Gluon's binder and cache lookup are what is skipped.
    run_compiled(kernel, (p, 1, 1), x2.device.index, (*descs, *ptrs, *ints, *consts))
    return kernel


class BoundLaunch:
    """A compiled ws kernel bound to one layer, M and configuration (a BoundLinear plan). A call
    encodes x's TMA descriptor (one driver call) and calls the compiled launcher's C entry with
    every other argument fixed when bound: the codes' descriptor encoded once, the scales, bias
    and counters as addresses, the integers and constexprs. What `launch` passes, in its order."""

    __slots__ = ("tma", "programs", "x_enc", "x_shape", "x_strides", "q_args", "s_ptr", "b_ptr", "cnt_ptr",
                 "stream_k", "tail")

    def __call__(self, x_ptr: int, out_ptr: int, ws_ptr: int, stream: int) -> None:
        t = self.tma
        x_map = t.fill(x_ptr, *self.x_enc, self.x_shape, self.x_strides, 0)
        t.fn(self.programs, 1, 1, stream, t.function, t.coop, t.pdl, None, None, t.metadata, None, None, None,
             x_map, *self.x_shape, *self.x_strides, *self.q_args, self.s_ptr, out_ptr, self.b_ptr or out_ptr,
             ws_ptr if self.stream_k else out_ptr, self.cnt_ptr, *self.tail)


def bind(kernel, x2: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, out: torch.Tensor, cfg: WsConfig,
         group: int, bias: torch.Tensor | None = None, programs: int | None = None,
         ws: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> BoundLaunch | None:
    """The launch `launch` just made with these arguments (`kernel`, what it returned), bound for
    later calls that differ only in x's, out's and the workspace's addresses: x contiguous and
    16-byte aligned, out fresh from torch.empty, ws of the same size. None with FAST_LAUNCH off
    or where the compiled launcher's C entry cannot be called directly (tma_launcher)."""
    tma = tma_launcher(kernel) if settings.FAST_LAUNCH else None
    if tma is None or len(tma.encodings) != 2 or not x2.is_contiguous():
        return None
    p, ints, consts, _ = _arguments(x2, sz, out, cfg, group, bias, programs, ws, counters)
    q = codes.view(torch.int32).view(-1, 16)
    b = BoundLaunch()
    b.tma, b.programs, b.stream_k, b.tail = tma, p, programs is not None, (*ints, *consts)
    b.x_enc, b.x_shape, b.x_strides = tma.encodings[0], list(x2.shape), [x2.shape[1], 1]
    q_shape, q_strides = list(q.shape), [16, 1]
    b.q_args = (tma.fill(q.data_ptr(), *tma.encodings[1], q_shape, q_strides, 0), *q_shape, *q_strides)
    b.s_ptr, b.b_ptr = sz.data_ptr(), 0 if bias is None else bias.data_ptr()
    b.cnt_ptr = (sz if counters is None else counters).data_ptr()
    return b

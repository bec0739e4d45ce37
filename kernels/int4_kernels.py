"""The native backend's Triton kernels (device code): the tensor-core tile kernel with its split-K,
stream-K and warp-K products, the CUDA-core GEMV, x's preparation for it, and dequantization.

kernels/int4_triton.py chooses among their configurations, launches them and binds them to a layer;
the codes' bit tricks are kernels/int4_codes.py's and the layouts they read kernels/int4_layouts.py's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quantbridge.kernels.int4_codes import as_float, dequant_operand, dequant_words, k4_order


@triton.jit
def _weight_offsets(rows, cols, stride_wn, K8, TILED: tl.constexpr, BYTES: tl.constexpr, RUN: tl.constexpr):
    """Offsets from the weight pointer of rows [R, 1] x columns [1, C] (or [1, R, 1] x [S, 1, C]: a warp-K
    tile's), in the loaded unit: int32
    words, or bytes (BYTES). TILED: the layout to_tiled() makes, tiles of TILE_ROWS rows x TILE_WORDS
    words stored whole and row-major, so 8 rows of one tile are 512 contiguous bytes. RUN: how many
    consecutive columns stay contiguous (the hint that keeps 16-byte loads)."""
    if TILED:  # 64, 16, 1024: TILE_ROWS, TILE_WORDS and their product (a jit function sees no globals)
        w = cols // 4 if BYTES else cols
        off = ((rows // 64) * (K8 // 16) + w // 16) * 1024 + (rows % 64) * 16 + w % 16
        if BYTES:
            off = off * 4 + cols % 4
        if len(off.shape) == 3:  # a warp-K tile's [slices, rows, columns]
            off = tl.max_contiguous(tl.multiple_of(off, [1, 1, RUN]), [1, 1, RUN])
        else:
            off = tl.max_contiguous(tl.multiple_of(off, [1, RUN]), [1, RUN])
        return off
    else:
        return rows * stride_wn + cols


@triton.jit
def _last_split(cnt, count):
    """True in the program that is the last of `count` to reach this tile's counter.

    The barrier orders every thread's workspace stores before the (single-thread) release
    of the counter; the acquire makes the other splits' stores visible to the last one."""
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    return arrived == count - 1


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, out_ptr, ws_ptr, cnt_ptr, b_ptr,
    M, N, K, NGROUPS, stride_wn, magic_bits, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, FACTORED: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSETS: tl.constexpr,
    MODE: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, TILED: tl.constexpr,
    SZ_PACKED: tl.constexpr, WARP_K: tl.constexpr,
):
    """Tensor-core tiles. OFFSETS: w = q * s + m with a float offset m per group (m_ptr)
    instead of (q - z) * s. EVEN_K: K is a multiple of BLOCK_K, so no load needs a K mask
    (the weight is then read in 16-byte vectors). stride_wn: elements per weight row.

    MODE >= 3 with one group per tile (WORD_TILES): the weight is read as int32 words and each
    word becomes its 8 codes minus the zero point, exactly, in the activation dtype
    (int4_codes.dequant_words: 11 instructions per 8 codes); the scale applies once per tile. For
    BLOCK_M <= 16 the product is computed transposed (W x^T), so N, not the few rows of x,
    is the tensor-core M dimension (wgmma on Hopper). Otherwise the weight is read as bytes,
    each tile split into even and odd columns, the two nibbles meeting the even and odd
    activations in two dots.

    MODE 8 ("operand"; the codes in int4_layouts' operand layout, one group per tile, no float
    offsets): every tile is a word tile computed as W x^T, the weight dequantized with its scale
    applied (int4_codes.dequant_operand) straight into the tensor-core register operand, and the
    dot accumulating across K tiles, so consecutive wgmma need not wait for each other.

    SZ_PACKED (operand tiles): 1, s_ptr points at one int32 per (row, group), the scale's 16 bits low and the
    zero point above (pack_scales_zeros); 2, at its split words (SZ_SPLIT). A scale alone is 2 bytes at stride
    NGROUPS, below the 4 bytes of an asynchronous copy, so Triton's pipeliner left those loads in the iteration
    that used them (SASS: LDG.E.U16 and LDG.E.U8 feeding the dequantization) and every warp waited a load
    latency at each group; packed, they are staged through shared memory `num_stages` deep like the codes
    (LDGSTS, then LDS).

    WARP_K > 1 (operand codes, BLOCK_M 8: warp_k): each K step of BLOCK_K columns is WARP_K slices
    of BLOCK_K / WARP_K, one a warp, multiplied as one batched dot and summed across the warps once,
    after the K loop (_warp_k_product).
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_bm = tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    if SPLIT_K < 0:
        # Stream-K over -SPLIT_K programs: the (output tile, K-tile) steps, tile-major, cut into
        # equal contiguous runs, one per program, so every SM gets the same work however few
        # tiles there are. A tile a run covers whole is stored at once; one shared by several runs
        # is summed by the last of them to arrive, each run's part in its own workspace slot
        # (two per program: its first tile and its last). -SPLIT_K <= the number of steps.
        P: tl.constexpr = -SPLIT_K
        units = tl.cdiv(M, BLOCK_M) * num_pid_n * k_tiles  # units * P < 2^31 (stream_k_fits)
        u0 = pid * units // P
        u1 = (pid + 1) * units // P
        first = u0 // k_tiles
        for tile in range(first, (u1 - 1) // k_tiles + 1):
            t0 = tile * k_tiles
            ks = tl.maximum(u0, t0) - t0
            ke = tl.minimum(u1, t0 + k_tiles) - t0
            pid_m = tile // num_pid_n
            pid_n = tile % num_pid_n
            acc = _product(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, M, N, K, NGROUPS, stride_wn, stride_xm,
                           pid_m, pid_n, ks, ke, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FACTORED, OFFSETS, MODE,
                           EVEN_K, USE_ASM, TILED, SZ_PACKED, WARP_K)
            offs_m = pid_m * BLOCK_M + offs_bm
            offs_n = pid_n * BLOCK_N + offs_bn
            out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            out_off = offs_m[:, None] * stride_om + offs_n[None, :]
            if (ks == 0) & (ke == k_tiles):
                _store_tile(acc, out_ptr, out_off, out_mask, b_ptr, offs_n, N, HAS_BIAS)
            else:
                local = offs_bm[:, None] * BLOCK_N + offs_bn[None, :]
                slot = 2 * pid + (tile != first).to(tl.int32)
                # rows of x past M are never stored: at M=1 on 16-row tiles the unmasked partials were
                # 16x the bytes, written to L2 and evicted to DRAM by the weight stream (NOTES, r7)
                rows = (offs_m < M)[:, None]
                tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + local, acc, mask=rows)
                # the programs whose runs meet this tile: the owners of its first and last step
                p_lo = ((t0 + 1) * P + units - 1) // units - 1
                p_hi = ((t0 + k_tiles) * P + units - 1) // units - 1
                if _last_split(cnt_ptr + tile, p_hi - p_lo + 1):
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for q in range(p_lo, p_hi + 1):  # in program order: the sum does not depend on arrival order
                        q_slot = 2 * q + (q * units // P < t0).to(tl.int32)  # this tile is q's first, or its last
                        total += tl.load(ws_ptr + q_slot * (BLOCK_M * BLOCK_N) + local, mask=rows, other=0.0,
                                         cache_modifier=".cg")
                    _store_tile(total, out_ptr, out_off, out_mask, b_ptr, offs_n, N, HAS_BIAS)
                    tl.atomic_xchg(cnt_ptr + tile, 0)  # the counter is zero again for the next launch
    else:
        pid_k = tl.program_id(1)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        t_start = pid_k * per_split
        if EVEN_K:
            t_end = tl.minimum(t_start + per_split, k_tiles)
        else:
            # Tiles past K (in the last split) are fully masked below: they load nothing.
            t_end = t_start + per_split
        acc = _product(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, M, N, K, NGROUPS, stride_wn, stride_xm,
                       pid_m, pid_n, t_start, t_end, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FACTORED, OFFSETS, MODE,
                       EVEN_K, USE_ASM, TILED, SZ_PACKED, WARP_K)
        offs_m = pid_m * BLOCK_M + offs_bm
        offs_n = pid_n * BLOCK_N + offs_bn
        mask_m = offs_m < M
        mask_n = offs_n < N
        out_mask = mask_m[:, None] & mask_n[None, :]
        out_off = offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLIT_K == 1:
            _store_tile(acc, out_ptr, out_off, out_mask, b_ptr, offs_n, N, HAS_BIAS)
        else:
            # Each split writes its own slice; the last of the tile's splits to arrive sums them.
            ws_off = offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_ptr + pid_k * M * N + ws_off, acc, mask=out_mask)
            if _last_split(cnt_ptr + pid, SPLIT_K):
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for i in range(SPLIT_K):  # in split order: the sum does not depend on arrival order
                    total += tl.load(ws_ptr + i * M * N + ws_off, mask=out_mask, other=0.0, cache_modifier=".cg")
                _store_tile(total, out_ptr, out_off, out_mask, b_ptr, offs_n, N, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + pid, 0)  # the counter is zero again for the next launch


@triton.jit
def _store_tile(acc, out_ptr, out_off, out_mask, b_ptr, offs_n, N, HAS_BIAS: tl.constexpr):
    """acc (+ bias) into out, in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _product(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, M, N, K, NGROUPS, stride_wn, stride_xm, pid_m, pid_n,
             t_start, t_end, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, FACTORED: tl.constexpr, OFFSETS: tl.constexpr, MODE: tl.constexpr,
             EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, TILED: tl.constexpr, SZ_PACKED: tl.constexpr,
             WARP_K: tl.constexpr):
    """Output tile (pid_m, pid_n) over K steps [t_start, t_end): [BLOCK_M, BLOCK_N] in fp32."""
    if WARP_K > 1:
        acc = _warp_k_product(x_ptr, qw_ptr, s_ptr, z_ptr, M, N, K, NGROUPS, stride_wn, stride_xm, pid_m, pid_n,
                              t_start, t_end, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, USE_ASM, TILED, SZ_PACKED,
                              WARP_K)
    else:
        acc = _tile_product(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, M, N, K, NGROUPS, stride_wn, stride_xm,
                            pid_m, pid_n, t_start, t_end, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, FACTORED, OFFSETS, MODE,
                            EVEN_K, USE_ASM, TILED, SZ_PACKED)
    return acc


@triton.jit
def _warp_k_product(x_ptr, qw_ptr, s_ptr, z_ptr, M, N, K, NGROUPS, stride_wn, stride_xm, pid_m, pid_n,
                    t_start, t_end, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, TILED: tl.constexpr,
                    SZ_PACKED: tl.constexpr, WARP_K: tl.constexpr):
    """A decode tile whose warps split K inside the program: each step's BLOCK_K columns are WARP_K
    slices of SK = BLOCK_K / WARP_K (each inside one group), the weight's [WARP_K, BLOCK_N, SK]
    dequantized into a batched dot's register operand against x's [WARP_K, SK, BLOCK_M] (8 rows of x:
    mma.sync's n8), one slice a warp (a 3-D dot puts the warps on the batch axis); the WARP_K partial
    tiles are summed once,
    after the loop, through shared memory. So a program of 4 or 8 warps covers BLOCK_N rows over the
    whole of K (or its split) with no counter between programs: on an H100 the 16-row tile's few
    warps waited on the split-K epilogue and issued most of the time (benchmarks/NOTES.md, kind 2).
    Operand codes only (MODE 8, no float offsets)."""
    SK: tl.constexpr = BLOCK_K // WARP_K
    WORDS: tl.constexpr = SK // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_x = (offs_m < M)[None, :, None]
    rows_w = offs_n[None, :, None]
    sl = tl.arange(0, WARP_K)
    acc = tl.zeros((WARP_K, BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, tl.maximum(t_end - t_start, 1)):  # at least one trip, as _tile_product's loop
        st = (t_start + i) * WARP_K + sl  # the step's slices, SK columns each: [WARP_K]
        kk = st[:, None, None] * SK + tl.arange(0, SK)[None, None, :]
        ow = st[:, None, None] * WORDS + tl.arange(0, WORDS)[None, None, :]
        w_off = _weight_offsets(rows_w, ow, stride_wn, K // 8, TILED, False, min(WORDS, 16))
        if EVEN_K:
            x = tl.load(x_ptr + offs_m[None, :, None] * stride_xm + kk, mask=rows_x, other=0.0)
            words = tl.load(qw_ptr + w_off, mask=mask_n[None, :, None], other=0, eviction_policy="evict_first")
        else:
            x = tl.load(x_ptr + offs_m[None, :, None] * stride_xm + kk, mask=rows_x & (kk < K), other=0.0)
            words = tl.load(qw_ptr + w_off, mask=mask_n[None, :, None] & (ow < K // 8), other=0,
                            eviction_policy="evict_first")
        g = (st * SK) // GROUP
        in_k = mask_n[None, :] & (st * SK < K)[:, None]  # slices past K must not read past the scales
        # z stays int32 here: a uint8 zero point in the operand's making sends the tile through shared memory
        s, z = _scale_zero(s_ptr, z_ptr, offs_n[None, :], g[:, None], in_k, N, NGROUPS, SZ_PACKED, False, x.dtype)
        # K in k4_order on both sides: each thread's operand registers are then its own unpacked words
        acc = tl.dot(dequant_operand(words, z, s, x.dtype, USE_ASM), tl.permute(k4_order(x), (0, 2, 1)), acc)
    return tl.trans(tl.sum(acc, axis=0))


@triton.jit
def _tile_product(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, M, N, K, NGROUPS, stride_wn, stride_xm, pid_m, pid_n,
                  t_start, t_end, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, FACTORED: tl.constexpr, OFFSETS: tl.constexpr, MODE: tl.constexpr,
                  EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, TILED: tl.constexpr, SZ_PACKED: tl.constexpr):
    """Output tile (pid_m, pid_n) over K-tiles [t_start, t_end): [BLOCK_M, BLOCK_N] in fp32 (see
    _int4_matmul_kernel for the modes)."""
    OPERAND: tl.constexpr = MODE == 8 and BLOCK_K <= GROUP
    WORD_TILES: tl.constexpr = (MODE >= 3 and BLOCK_K <= GROUP and BLOCK_M <= 64) or OPERAND
    SWAP: tl.constexpr = WORD_TILES and (BLOCK_M <= 16 or OPERAND)
    # MODE >= 3 runs tiles of BLOCK_M > 64 as byte tiles converting codes with cvt, as "i2f"
    # does: on the H200 its 128-row word tiles spilled registers and the bit trick's fp32
    # path (two lop3 per code) was slower there (benchmarks/NOTES.md).
    CONV: tl.constexpr = 0 if MODE >= 3 and BLOCK_M > 64 else MODE
    HALF: tl.constexpr = BLOCK_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    K2 = K // 2

    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # At least one trip, provably (no split is empty: splits()): a loop that may run zero times
    # leaves a path where the accumulator is set to zero by plain moves and meets the loop's wgmma
    # before their final wait, and ptxas then serializes every wgmma of the kernel (its C7515; every
    # operand tile did). Written this way the accumulator is only ever defined by wgmma.
    for i in range(0, tl.maximum(t_end - t_start, 1)):
        t = t_start + i
        kk = t * BLOCK_K + offs_k
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None], other=0.0)
        else:
            x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        if WORD_TILES:
            WORDS: tl.constexpr = BLOCK_K // 8
            offs_w = t * WORDS + tl.arange(0, WORDS)
            if EVEN_K:
                words = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], offs_w[None, :], stride_wn, K // 8, TILED, False,
                                                         min(WORDS, 16)),
                                mask=mask_n[:, None], other=0, eviction_policy="evict_first")
            else:
                words = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], offs_w[None, :], stride_wn, K // 8, TILED, False,
                                                         min(WORDS, 16)),
                                mask=mask_n[:, None] & (offs_w < K // 8)[None, :], other=0,
                                eviction_policy="evict_first")
            g = (t * BLOCK_K) // GROUP
            in_k = mask_n & (t * BLOCK_K < K)  # tiles past K (last split) must not read past the scales
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, g, in_k, N, NGROUPS, SZ_PACKED, OFFSETS, x.dtype)
            z = z.to(tl.uint8)
            if OPERAND:
                tl.static_assert(not OFFSETS, "the operand layout takes no float offsets")
                acc_t = tl.dot(dequant_operand(words, z, s, x.dtype, USE_ASM), tl.trans(x), acc_t)
            else:
                s = s.to(tl.float32)
                q = tl.reshape(dequant_words(words, z, x.dtype, USE_ASM), (BLOCK_N, BLOCK_K))  # q - z, exact
                if SWAP:
                    part = tl.dot(q, tl.trans(x))  # [BLOCK_N, BLOCK_M]
                    acc_t += s[:, None] * part
                    if OFFSETS:
                        acc_t += tl.load(m_ptr + offs_n * NGROUPS + g, mask=in_k, other=0.0).to(tl.float32)[:, None] * \
                            tl.sum(x.to(tl.float32), axis=1)[None, :]
                else:
                    acc += s[None, :] * tl.dot(x, tl.trans(q))
                    if OFFSETS:
                        acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * \
                            tl.load(m_ptr + offs_n * NGROUPS + g, mask=in_k, other=0.0).to(tl.float32)[None, :]
        else:
            kb = t * HALF + offs_h  # byte column
            if EVEN_K:
                p = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], kb[None, :], stride_wn, K // 8, TILED, True,
                                                     min(HALF, 64)),
                            mask=mask_n[:, None], other=0, eviction_policy="evict_first" if MODE > 0 else "")
            else:
                p = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], kb[None, :], stride_wn, K // 8, TILED, True,
                                                     min(HALF, 64)),
                            mask=mask_n[:, None] & (kb < K2)[None, :], other=0,
                            eviction_policy="evict_first" if MODE > 0 else "")  # read once: keep L2 for x and scales
            lo = p & 0xF  # even columns
            hi = p >> 4  # odd columns
            # Contiguous load, then split into even/odd columns in registers: the weight tile
            # keeps its loaded layout and meets each half of x in its own dot.
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            if BLOCK_K <= GROUP:
                g = (t * BLOCK_K) // GROUP
                in_k = mask_n & (t * BLOCK_K < K)  # tiles past K (last split) must not read past the scales
                s = tl.load(s_ptr + offs_n * NGROUPS + g, mask=in_k, other=0.0).to(tl.float32)
                if OFFSETS:
                    b = tl.load(m_ptr + offs_n * NGROUPS + g, mask=in_k, other=0.0).to(tl.float32)
                else:
                    b = -s * tl.load(z_ptr + offs_n * NGROUPS + g, mask=in_k, other=0).to(tl.float32)
                if FACTORED:
                    # sum_k (q s + b) x = s * sum_k q x + b * sum_k x (b = -z s, or the offset): the
                    # inner loop only converts codes (0..15, exact in fp16/bf16); scale and zero
                    # apply once per tile.
                    xq = tl.dot(x_even, tl.trans(as_float(lo, x.dtype, CONV)))
                    xq = tl.dot(x_odd, tl.trans(as_float(hi, x.dtype, CONV)), xq)
                    xs = tl.sum(x.to(tl.float32), axis=1)
                    acc += s[None, :] * xq + xs[:, None] * b[None, :]
                else:
                    w_lo = (as_float(lo, tl.float32, CONV) * s[:, None] + b[:, None]).to(x.dtype)
                    w_hi = (as_float(hi, tl.float32, CONV) * s[:, None] + b[:, None]).to(x.dtype)
                    acc = tl.dot(x_even, tl.trans(w_lo), acc)
                    acc = tl.dot(x_odd, tl.trans(w_hi), acc)
            else:
                # The tile spans several groups: gather a scale and zero per element.
                g = (2 * kb) // GROUP
                sz_off = offs_n[:, None] * NGROUPS + g[None, :]
                sz_mask = mask_n[:, None] & (kb < K2)[None, :]
                s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                if OFFSETS:
                    b = tl.load(m_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                else:
                    b = -s * tl.load(z_ptr + sz_off, mask=sz_mask, other=0).to(tl.float32)
                acc = tl.dot(x_even, tl.trans((as_float(lo, tl.float32, CONV) * s + b).to(x.dtype)), acc)
                acc = tl.dot(x_odd, tl.trans((as_float(hi, tl.float32, CONV) * s + b).to(x.dtype)), acc)
    if SWAP:
        acc = tl.trans(acc_t)
    return acc


@triton.jit
def _scale_zero(s_ptr, z_ptr, rows, g, mask, N, NGROUPS, SZ_PACKED: tl.constexpr, OFFSETS: tl.constexpr,
                DT: tl.constexpr):
    """Scales and zero points (int32) of weight rows `rows` in groups `g`, the two broadcast together (a
    tile's [BLOCK_N] and one group; a warp-K tile's [1, BLOCK_N] and [WARP_K, 1]): from the split words
    (SZ_PACKED 2: group-major, BLOCK_N contiguous of each), the [N, groups] words (1, scale in DT), or
    the layer's own tensors (0; OFFSETS: no zero points, w = q s + m)."""
    if SZ_PACKED == 2:
        v = tl.load(s_ptr + (g // 2) * N + rows, mask=mask, other=0)
        s = ((v >> ((g % 2) * 16)) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        v = tl.load(s_ptr + ((NGROUPS + 1) // 2 + g // 8) * N + rows, mask=mask, other=0)
        z = (v >> ((g % 8) * 4)) & 0xF
    elif SZ_PACKED == 1:
        v = tl.load(s_ptr + rows * NGROUPS + g, mask=mask, other=0)
        s = (v & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        z = (v >> 16) & 0xFF
    else:
        s = tl.load(s_ptr + rows * NGROUPS + g, mask=mask, other=0.0)
        if OFFSETS:
            z = tl.zeros_like(rows + g)
        else:
            z = tl.load(z_ptr + rows * NGROUPS + g, mask=mask, other=0).to(tl.int32)
    return s, z


@triton.jit
def _tile_words(w_rows, t, valid, mask_n, K8, WORDS: tl.constexpr, EVEN_K: tl.constexpr):
    """The GEMV's K-tile t of words ([BLOCK_N, WORDS]); all zero where `valid` is false."""
    offs_w = t * WORDS + tl.arange(0, WORDS)
    mask = mask_n[:, None] & valid
    if not EVEN_K:
        mask = mask & (offs_w < K8)[None, :]
    return tl.load(w_rows + offs_w[None, :], mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _prep_x_kernel(x_ptr, xp_ptr, K8, stride_xm, BLOCK: tl.constexpr):
    """The GEMV's activations for MODE 6, once per call: row r's x[8w + j] * 16^-P(j) in fp32 at
    xp[r, j, w] (P(j) = j for j < 5, else j - 3, where the GEMV finds nibble j). Every column
    program of the GEMV then reads, per nibble, one contiguous run of its words' activations,
    with no conversion or scaling of its own."""
    row = tl.program_id(1)
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = w < K8
    for j in tl.static_range(8):
        P = j if j < 5 else j - 3
        v = tl.load(x_ptr + row * stride_xm + w * 8 + j, mask=mask, other=0.0).to(tl.float32)
        tl.store(xp_ptr + (row * 8 + j) * K8 + w, v * (1.0 / (1 << (4 * P))), mask=mask)


@triton.jit
def _tile_scales(s_ptr, z_ptr, m_ptr, offs_n, mask, g, NGROUPS, BLOCK_N: tl.constexpr, OFFSETS: tl.constexpr):
    """(scale, zero, offset) of group g for the GEMV's rows, in fp32; zero is 0 with OFFSETS, offset 0 without."""
    sc = tl.load(s_ptr + offs_n * NGROUPS + g, mask=mask, other=0.0).to(tl.float32)
    if OFFSETS:
        zp = tl.zeros((BLOCK_N,), dtype=tl.float32)
        off = tl.load(m_ptr + offs_n * NGROUPS + g, mask=mask, other=0.0).to(tl.float32)
    else:
        zp = tl.load(z_ptr + offs_n * NGROUPS + g, mask=mask, other=0).to(tl.float32)
        off = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return sc, zp, off


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, out_ptr, ws_ptr, cnt_ptr, b_ptr,
    M, N, K, NGROUPS, stride_wn, magic_bits, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, OFFSETS: tl.constexpr, MODE: tl.constexpr, EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr, STAGES: tl.constexpr, TILED: tl.constexpr,
):
    """One activation row per program on CUDA cores: no tensor-core tile to pad M=1 to 16.

    The weight is read as int32 words (8 codes each, column 8i+j in nibble j: the canonical
    byte layout read little-endian). A tile lies in one group (BLOCK_K divides GROUP), so
    scale and zero apply once per tile. The accumulator keeps the word axis ([BLOCK_N, WORDS])
    and is reduced once at the end: a cross-thread reduction per nibble and tile cost more
    issue slots than the arithmetic itself.

    MODE (see CODE_MODES) 1: each nibble is shifted down, ORed into the mantissa of 2^23, and
    (2^23 + z) is subtracted, which gives q - z exactly in one FADD, with no integer-to-float
    conversion (a quarter-rate instruction on Hopper, and the bound of this loop) and no
    per-tile zero term: s * sum (q - z) x. >= 2: nibbles 0-4 stay in place (the mantissa of
    2^23 holds bits 0..22), giving (q - z) 16^p with x scaled by 16^-p (exact: powers of
    two); nibbles 5-7 come from one shift of the word by 12: one shift per word, not eight.
    2^23's bits come in as an argument (magic_bits), so the and and the or of each nibble
    are one lop3 (an instruction takes one immediate). OFFSETS: s * sum q x + m * sum x.
    EVEN_K: K is a multiple of BLOCK_K, so no load needs a K mask. MODE 8: the codes are in
    int4_layouts' operand layout, so nibble j of a word holds another column (operand_source).
    STAGES > 1 (MODE 5): Triton
    pipelines the K loop's weight loads, copying tiles asynchronously (cp.async) into a ring of
    STAGES shared buffers, so STAGES - 1 tiles are in flight while one is decoded; a loop with
    no dot is not pipelined unless asked.
    """
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    K8 = K // 8
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    t_end = tl.minimum(t_start + per_split, k_tiles)

    acc2 = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    OPERAND: tl.constexpr = MODE == 8
    w_rows = qw_ptr + offs_n[:, None] * stride_wn
    x_row = x_ptr + row * stride_xm
    if MODE == 4:
        ahead = _tile_words(w_rows, t_start, t_start < t_end, mask_n, K8, WORDS, EVEN_K)
    if MODE == 5:
        sc_next, zp_next, off_next = _tile_scales(s_ptr, z_ptr, m_ptr, offs_n, mask_n & (t_start < t_end),
                                                  (t_start * BLOCK_K) // GROUP, NGROUPS, BLOCK_N, OFFSETS)
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        offs_w = t * WORDS + tl.arange(0, WORDS)
        mask_w = (offs_w < K8) | EVEN_K  # constant true for EVEN_K: no mask along the row
        if MODE == 4:
            # The next tile's load is issued before this one is decoded: its latency hides
            # behind the arithmetic instead of stalling the next iteration.
            words = ahead
            ahead = _tile_words(w_rows, t + 1, t + 1 < t_end, mask_n, K8, WORDS, EVEN_K)
        elif TILED:  # K is a multiple of 128 here, so of BLOCK_K up to 128 (a longer tile masks its tail)
            words = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], offs_w[None, :], stride_wn, K8, TILED, False,
                                                     min(WORDS, 16)),
                            mask=mask_n[:, None] & mask_w[None, :], other=0, eviction_policy="evict_first")
        elif EVEN_K and MODE >= 2:
            words = tl.load(w_rows + offs_w[None, :], mask=mask_n[:, None], other=0, eviction_policy="evict_first")
        else:
            words = tl.load(w_rows + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :], other=0,
                            eviction_policy="evict_first" if MODE > 0 else "")  # read once: keep L2 for x and scales
        if MODE == 5:
            # Scales and zeros are 1-2 bytes a row, too small for cp.async: the next tile's are
            # loaded into registers a tile ahead instead.
            sc, zp, off = sc_next, zp_next, off_next
            sc_next, zp_next, off_next = _tile_scales(s_ptr, z_ptr, m_ptr, offs_n, mask_n & (t + 1 < t_end),
                                                      ((t + 1) * BLOCK_K) // GROUP, NGROUPS, BLOCK_N, OFFSETS)
        else:
            sc, zp, off = _tile_scales(s_ptr, z_ptr, m_ptr, offs_n, mask_n, (t * BLOCK_K) // GROUP, NGROUPS,
                                       BLOCK_N, OFFSETS)
        qx = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        xs = tl.zeros((WORDS,), dtype=tl.float32)
        if OPERAND:
            x_word = x_row + (offs_w // 4) * 32 + (offs_w % 4) * 2  # the chunk's columns 2i.. (int4_layouts)
        else:
            x_word = x_row + offs_w * 8
        if MODE >= 2:
            upper = words >> 12  # nibbles 5, 6, 7 now at positions 2, 3, 4
            for j in tl.static_range(8):
                P = j if j < 5 else j - 3  # the nibble sits at bits 4P..4P+3
                if MODE == 6:
                    # prepared by _prep_x_kernel: [8, K/8] per row, fp32, already times 16^-P. The
                    # word stride (= K/8) carries Triton's 16-divisibility, K // 8 does not: 16-byte loads.
                    if EVEN_K:
                        xp = tl.load(x_row + j * stride_wn + offs_w)
                    else:
                        xp = tl.load(x_row + j * stride_wn + offs_w, mask=mask_w, other=0.0)
                    xj = xp * (1 << (4 * P))  # exact (a power of two); only the OFFSETS sum uses it
                else:
                    # nibble j = 4c + 2b + a of the operand layout is column 16a + 8b + c past x_word's;
                    # a constant past one pointer per word, so the loads take it as an immediate offset
                    col = 16 * (j % 2) + 8 * ((j // 2) % 2) + j // 4 if OPERAND else j
                    if EVEN_K:
                        xj = tl.load(x_word + col).to(tl.float32)
                    else:
                        xj = tl.load(x_word + col, mask=mask_w, other=0.0).to(tl.float32)
                    xp = xj * (1.0 / (1 << (4 * P)))
                if j < 5:  # nibble j at bits 4j..4j+3
                    bits = (words & (0xF << (4 * j))) | magic_bits
                else:  # nibble j at bits 4(j-3).. of the shifted word
                    bits = (upper & (0xF << (4 * (j - 3)))) | magic_bits
                qf = bits.to(tl.float32, bitcast=True) - (8388608.0 + zp * (1 << (4 * P)))[:, None]
                qx += qf * xp[None, :]
                if OFFSETS:
                    xs += xj
        elif MODE == 1:
            bias = (8388608.0 + zp)[:, None]  # 2^23 + z, exact
            for j in tl.static_range(8):
                xj = tl.load(x_row + offs_w * 8 + j, mask=mask_w, other=0.0).to(tl.float32)
                qf = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - bias
                qx += qf * xj[None, :]
                if OFFSETS:
                    xs += xj
        else:
            for j in tl.static_range(8):
                xj = tl.load(x_row + offs_w * 8 + j, mask=mask_w, other=0.0).to(tl.float32)
                qx += ((words >> (4 * j)) & 0xF).to(tl.float32) * xj[None, :]
                xs += xj
        if OFFSETS:
            acc2 += sc[:, None] * qx + off[:, None] * xs[None, :]
        elif MODE >= 1:
            acc2 += sc[:, None] * qx  # qx holds sum (q - z) x already
        else:
            acc2 += sc[:, None] * (qx - zp[:, None] * xs[None, :])
    acc = tl.sum(acc2, axis=1)

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(ws_ptr + (pid_k * M + row) * N + offs_n, acc, mask=mask_n)
        tile = row * tl.num_programs(0) + pid_n
        if _last_split(cnt_ptr + tile, SPLIT_K):
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for i in range(SPLIT_K):  # in split order: the sum does not depend on arrival order
                total += tl.load(ws_ptr + (i * M + row) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # the counter is zero again for the next launch


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, m_ptr, w_ptr, N, K, NGROUPS, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFFSETS: tl.constexpr, OPERAND: tl.constexpr,
                    TILED: tl.constexpr):
    """Int4Weight -> dense [N, K] weight (for large M, where cuBLAS then wins).

    BLOCK_K never crosses a group, so scale and zero are one load per row. The arithmetic is
    the reference's, (q - z) * s or q * s + m in fp32, so the result is the same bit for bit.
    OPERAND: the codes are in int4_layouts' operand layout; each value is stored at the column it
    holds (a permutation inside each 32-column chunk: the same 64-byte lines are written).
    TILED: the words are stored tile-major (int4_layouts.to_tiled)."""
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1) * HALF + tl.arange(0, HALF)
    mask_n = offs_n < N
    p = tl.load(qw_ptr + _weight_offsets(offs_n[:, None], kb[None, :], K // 2, K // 8, TILED, True, min(HALF, 64)),
                mask=mask_n[:, None] & (kb < K // 2)[None, :], other=0)
    q = as_float(tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K)), tl.float32, 1)
    g = (tl.program_id(1) * BLOCK_K) // GROUP
    s = tl.load(s_ptr + offs_n * NGROUPS + g, mask=mask_n, other=0.0).to(tl.float32)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if OPERAND:  # position 8i + j of a chunk (nibble j = 4c + 2b + a) holds column 16a + 8b + 2i + c
        pc = kk % 32
        jj = pc % 8
        kk = kk - pc + 16 * (jj % 2) + 8 * ((jj // 2) % 2) + 2 * (pc // 8) + jj // 4
    if OFFSETS:
        m = tl.load(m_ptr + offs_n * NGROUPS + g, mask=mask_n, other=0.0).to(tl.float32)
        w = q * s[:, None] + m[:, None]
    else:
        z = tl.load(z_ptr + offs_n * NGROUPS + g, mask=mask_n, other=0).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
    tl.store(w_ptr + offs_n[:, None] * K + kk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_n[:, None] & (kk < K)[None, :])

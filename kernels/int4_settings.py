"""The native kernel's revision and its settings, in one place.

Each setting below is an A/B switch of the kernels (int4_triton's Triton tiles, int4_wgmma's Hopper
tiles, how int4_tuner times them): the value is the default, the comment says what it does, what an
H100 measured and what stays as the variant (benchmarks/NOTES.md has each prediction and outcome).
The modules read them when they run, so a benchmark or a test sets one here (benchmarks/kernel_variants.py
names every variant by its settings); the tuner's key names every setting that changes what it picks
(int4_tuner.tuner_key), so a table tuned under one never serves another.
"""

from __future__ import annotations

import os

# Bumped when the kernels change in a way that can move the best configuration: tuned
# choices are kept per revision, so an older table is never applied to a newer kernel.
# r4: the tile kernel's K loop provably runs (its wgmma were serialized by ptxas before).
# r5: the operand tiles' search space grew (at M >= 128 BLOCK_K 128 tiles and a 128x256 stream-K
# tile, at M < 128 BLOCK_K 128 stream-K tiles, at M <= 16 stream-K tiles) and STREAM_K is on.
# r6: at M >= 64 the warp-specialized Gluon tiles (int4_wgmma) are candidates too (WGMMA_WS).
# r7: stream-K tiles write and read their fp32 partials for the rows of x that exist only (M=1 on a
# 16-row tile: 1/16 of the workspace bytes), which makes them cheaper against the GEMV at M < 16.
# r8: the tuner times the candidates within 5 % of the fastest again, in turns (kernels/tuning.py).
# r9: the ws tiles' stream-K parts summed in row chunks (FIXUP_ROWS 16), and where a layer
# has fewer ws tiles than half the SMs, stream-K runs that split each tile's K evenly are candidates.
# r10: the ws tiles' row-chunk fix-up issues four parts' loads at once (FIXUP_LOADS 4).
# r11: ws tiles launched bound (FAST_LAUNCH), so the tuner's eager timings of a ws candidate
# see its kernel, not ~110 us of Gluon's launch; a split run's parts summed by all its programs
# (FIXUP_SLICED).
# r12: each K step's zero-point bias -(2^e + z) built by integer ops (int4_codes.neg_magic_zero), the same
# bits: 7-29 fewer instructions a step in every tile's K loop compiled for sm_90 (benchmarks/NOTES.md).
REVISION = "r12"

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

# The warp-specialized Hopper tiles (int4_wgmma).

# When a consumer frees a stage: 1, the step after it, once its four groups are done (at the fourth
# chunk's wait); 2, the step after that, just before waiting for the stage it is about to read. Gluon
# puts a barrier of all consumer threads around each release (one thread arrives) and before each
# wait: two release points and one wait are three barriers a step; a release next to the wait shares
# one, two a step, at the cost of one stage of the producer's lead (ncu at M >= 128:
# benchmarks/NOTES.md): the producer runs STAGES - 2 steps ahead, not STAGES - 1 (every tile has 3 or more).
RELEASE_LAG = 1

# How a stream-K tile's parts are kept and summed: 0, all BLOCK_M rows of each part stored as the
# accumulator holds them, and the last program sums whole parts (128 more floats a thread), then
# stores through shared memory; R > 0, the parts stored x-row-major for the rows of x that exist
# only, with an L2 evict_last hint, and summed R rows of x at a time (R x BLOCK_N floats a chunk).
# ncu saw the 128x256 tile's 132-program twin take 23 % more cycles a step than the whole tile and
# write its 35 MB of parts back to DRAM. With R = 16 the twin took 7 % fewer cycles (its parts still
# reach DRAM) and, on an H100, M=128 ran 3 % faster and M=512 1 % in four processes each, on the
# same tiles as R = 0 (benchmarks/NOTES.md, r8); 0 stays as the A/B variant.
FIXUP_ROWS = 16
# Parts whose loads a row-chunk fix-up issues before adding them (FIXUP_ROWS > 0): 1, one part at a
# time, each load waiting on the last add; L > 1, L parts' loads in flight at once (added in program
# order either way, so the sum is the same bits). A tile split into s runs has its last program make
# s x BLOCK_M / FIXUP_ROWS such round trips while the SMs of the other runs sit idle: ncu of 4096x1024
# at M=512 on 32 tiles x 4 runs saw the SMs active 57 % of the time (benchmarks/NOTES.md, r9). 4 is the
# default since r10: its A/B on an H100 took 4096x1024 at M=512 from 23.8 to 19.5 us and 14336x4096 at
# M=64 from 33.8 to 30.2 us, the other shapes alike; 1 stays as the A/B variant.
FIXUP_LOADS = 4
# Who sums a split run's parts (FIXUP_ROWS > 0; programs = tiles x s, each tile's K in s runs, one per
# program): False, the tile's last program to arrive sums all its row chunks while the other s - 1
# have ended (the tail ncu saw, above); True, every program of the tile waits until all s parts are
# stored, then sums every s-th row chunk, in program order as before (the same bits). The wait needs
# all programs resident at once, which only a cooperative launch guarantees (other streams, graph
# branches or processes may hold SMs): such launches are cooperative, and the driver refuses one
# whose programs cannot all be resident. On since r11: with FAST_LAUNCH (which took the eager-timing
# floor off the tuner) an H100 ran the small layers' split runs 3.5-9 % faster tile for tile, and in
# two processes 3.2-5.8 % faster where both tuners picked a split run (benchmarks/NOTES.md, sixth and
# seventh sessions). False stays as the A/B variant.
FIXUP_SLICED = True

# How many partitions the consumer warpgroups are: 1, one partition of two warpgroups (8 warps) holding
# the whole [BLOCK_N, BLOCK_M] accumulator; 2, two partitions of one warpgroup each, partition h holding
# weight rows h * BLOCK_N / 2 .. of the tile (its codes, scales, accumulator and output columns), both
# waiting on the same `ready` barriers and each arriving on `empty` (count 2). Gluon's mbarrier.arrive is
# one thread's, so each release and each wait is fenced by a barrier of the whole partition: ncu on an
# H100 at M=512 saw the consumers stall on barriers 5.3 times per issued instruction, Machete's 3.4
# (benchmarks/NOTES.md); with two partitions each barrier holds 128 threads, not 256, and one warpgroup
# waits on it while the other goes on. A stream-K part is summed per half: a counter per (tile, half),
# and each half's last program sums that half's columns, in program order (the same bits as 1). An A/B
# setting, off: on an H100 it ran 5-26 % slower in 7 of 9 large-layer cells at M >= 64 (the same 64x256
# tile 8.5 % slower at 8192x28672 M=64; the 256-wide tiles it cannot offer won at M=512) and within 2 %
# in the other two (benchmarks/NOTES.md, sixth session).
CONSUMER_PARTS = 1

# int4_wgmma's launches after the first of each specialization call the compiled kernel's launcher
# directly, as _fast_launch does for the Triton tiles: Gluon's own path binds and specializes every argument and
# looks the kernel up on each call. Eager timing on an H100 found no ws tile below ~50-110 us, kernels
# of 15-80 us under graph replay: that host cost, paid by the tuner's eager timings and by any eager
# caller. A BoundLinear plan is bound (int4_wgmma.BoundLaunch) and the tuner times candidates so:
# on an H100 a ws call then cost the host 12-19 us against 111-126 through Gluon, and eager time was
# the kernel's (benchmarks/NOTES.md, seventh session). Its GPU test passed there, bit for bit against
# Gluon's launch; on since r11. False (the A/B variant): every launch through Gluon.
FAST_LAUNCH = True


def interpreting() -> bool:
    """Triton's interpreter runs no PTX: the kernels then take inline assembly's plain-op twin, and the
    tuner times nothing (it takes the first valid candidate)."""
    return os.environ.get("TRITON_INTERPRET") == "1"

"""Triton INT4 x BF16/FP16 matmul with fused dequantization (weight-only, group-wise): launches and layers.

The kernels (int4_kernels; int4_wgmma on Hopper) read the codes in the layout a layer keeps
(int4_layouts: canonical uint8 [N, K/2], low nibble = even column, or the operand layouts).
Two regimes, one interface:
  decode  (small M) memory-bound: every weight byte is read once; split-K or stream-K spreads a
          layer over all SMs; each split writes its fp32 partial to a workspace and the last split
          of a tile to finish (a per-tile counter) sums them: one launch, no memset.
  prefill (large M) tensor cores: large M tiles amortise the dequantization.
Here: one launch of a configuration (`launch`, `_run`), the shared split-K workspace, the packed
scales, and the layer API: `int4_linear` (derived per call) and `BoundLinear` (resolved once per M).
Which configurations exist is int4_configs'; which one runs, int4_tuner's (TUNER, timing candidates
through candidate_run); the A/B settings, int4_settings'.

Imported lazily: the package works without Triton.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantbridge.kernels import int4_configs as configs  # configs.ws_module(): looked up when called (tests stand in)
from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels._fast_launch import FastLauncher, hooks_active, raw_launcher
from quantbridge.kernels.int4_configs import (DEQUANT_CUBLAS, Config, cdiv, counter_slots, is_ws, operand_config,
                                              partials_numel, splits, stream_k_fits, warp_k)
from quantbridge.kernels.int4_kernels import _dequant_kernel, _int4_gemv_kernel, _int4_matmul_kernel, _prep_x_kernel
from quantbridge.kernels.int4_layouts import (OPERAND_LAYOUTS, TILED_LAYOUTS, operand_fits, relayout, split_sz_rows,
                                              sz_format, tileable)
from quantbridge.kernels.int4_tuner import Tuner
from quantbridge.plugin.packed import Int4Weight

KERNEL_NAME = "quantbridge.triton"
_MAGIC_BITS = 0x4B000000  # 2^23 as fp32 bits: a kernel argument, so it is a register, not an immediate


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
    _DEQUANT((cdiv(n, 64), cdiv(k, bk), 1), (w.qweight, w.scales, w.zeros, _offsets(w), out),
             (n, k, k // w.group_size), (w.group_size, 64, bk, w.offsets is not None, layout in OPERAND_LAYOUTS,
              layout in TILED_LAYOUTS))
    return out


_DEQUANT = FastLauncher(_dequant_kernel)


def _offsets(w: Int4Weight) -> torch.Tensor:
    """The offsets tensor, or (never read) the zero-points in its place."""
    return w.zeros if w.offsets is None else w.offsets


def _grid(cfg: Config, m: int, n: int) -> tuple[int, int, int]:
    bm, bn, _, sk, _, _ = cfg
    if sk < 0:
        return (-sk, 1, 1)
    return (cdiv(n, bn), sk, m) if bm == 1 else (cdiv(m, bm) * cdiv(n, bn), sk, 1)


def _kernel_args(cfg: Config, w: Int4Weight, m: int, k: int, has_bias: bool, layout: str = "canonical",
                 packed: int = 0) -> tuple[FastLauncher, torch.Tensor, tuple, tuple]:
    """(launcher, the weight view it reads, the integer arguments, the constexprs) of one configuration.
    layout: how w.qweight is laid out (int4_layouts; not canonical only for a bound layer).
    packed: the scales and zero points are read from pack_scales_zeros' words (operand tiles only):
    sz_format's 1 or 2; 0, w's own."""
    bm, bn, bk, sk, _, _ = cfg
    n = w.out_features
    mode = settings.CODE_MODES[settings.CODE_MODE]
    if sk < 0 and (bm == 1 or not stream_k_fits(m, n, k, bm, bn, bk, -sk)):
        raise ValueError(f"{cfg}: stream-K over {-sk} programs needs a tile configuration and at least as many "
                         f"(tile, K-tile) steps as programs for M={m}, N={n}, K={k}")
    if bm != 1 and sk > 0 and not splits(k, bk, sk):
        raise ValueError(f"{cfg}: split-K {sk} over {cdiv(k, bk)} whole K-tiles leaves a split empty; "
                         f"the tile kernel runs every split at least once")
    if layout in OPERAND_LAYOUTS:
        if mode != 8 or not operand_config(cfg, w.group_size) or w.offsets is not None:
            raise ValueError(f"codes in the operand layout need CODE_MODE 'operand', no float offsets and tiles "
                             f"of 32 or more columns inside one group, not {cfg} in {settings.CODE_MODE!r}")
    elif mode == 8:
        mode = 3  # canonical codes: the "asm" kernels
    if packed and (layout not in OPERAND_LAYOUTS or bm == 1):
        raise ValueError(f"packed scales and zero points are read by operand tiles only, not {cfg} in {layout!r}")
    if mode >= 3 and k % 8:
        mode = 2  # rows that are not whole int32 words: the byte path
    words = bm == 1 or (mode >= 3 and bk <= w.group_size and bm <= 64) or mode == 8  # the kernels' WORD_TILES
    qw = w.qweight.view(torch.int32) if words else w.qweight
    ints = (m, n, k, k // w.group_size, qw.shape[1], _MAGIC_BITS)
    tail = (has_bias, w.offsets is not None, mode, k % bk == 0, not settings.interpreting())
    if bm == 1:
        return _GEMV, qw, ints, (w.group_size, bn, bk, sk, *tail, cfg[5] if mode == 5 else 1, layout in TILED_LAYOUTS)
    if warp_k(cfg) > 1 and layout not in OPERAND_LAYOUTS:
        raise ValueError(f"{cfg}: a warp-K tile (BLOCK_M 8) reads operand codes only, not {layout!r}")
    return _MATMUL, qw, ints, (w.group_size, bm, bn, bk, sk, bm <= 16, *tail, layout in TILED_LAYOUTS, packed,
                               warp_k(cfg))


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
        ws_mod = configs.ws_module()
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
        _PREP((cdiv(k // 8, _PREP_BLOCK), m, 1), (x2, xp), (k // 8, sx), (_PREP_BLOCK,), 4, 1)
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
    return cfg[0] == 1 and settings.CODE_MODES[settings.CODE_MODE] == 6


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
    return settings.SCALES_PACKED and layout in OPERAND_LAYOUTS and w.offsets is None \
        and w.scales.element_size() == 2 and not (settings.SZ_SPLIT and w.zeros.numel() and int(w.zeros.max()) > 15)


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
    if not (settings.SZ_SPLIT if split is None else split):
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




def _bind_ws(kernel, cfg: Config, x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, bias: torch.Tensor | None,
             counters: torch.Tensor | None, stream: int, sz: torch.Tensor):
    """int4_wgmma.bind for the launch of a ws configuration that _run just made with these arguments
    (`kernel`, what it returned): an int4_wgmma.BoundLaunch, or None where the launch does not bind."""
    streamk = cfg[3] < 0
    ws = _workspace(x2.device, stream, partials_numel(cfg, x2.shape[0], w.out_features))[2] if streamk else None
    return configs.ws_module().bind(kernel, x2, w.qweight, sz, out, (cfg[0], cfg[1], cfg[5]), w.group_size, bias,
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


def candidate_run(cfg: Config, xb: torch.Tensor, out: torch.Tensor, counters: torch.Tensor | None, w: Int4Weight,
                  laid: Int4Weight | None, layout: str, sz: torch.Tensor | None):
    """How the tuner launches a candidate (int4_tuner.CandidateRun): a ws tile as a bound layer launches it
    (_ws_candidate), another tile on the laid-out codes, dequantize + cuBLAS on w (canonical codes, or for
    the operand layout the same operand codes). None: a ws tile where the layer has no packed scales."""
    if is_ws(cfg):
        return None if sz is None or laid is None else _ws_candidate(cfg, xb, laid, out, counters, sz)
    if laid is not None and cfg != DEQUANT_CUBLAS:
        return lambda: launch(xb, laid, out, cfg, counters=counters, layout=layout, sz=sz)
    return lambda: launch(xb, w, out, cfg, counters=counters, layout=dequant_layout(layout))


TUNER = Tuner(candidate_run)


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


def dequant_layout(layout: str) -> str:
    """The codes dequantize + cuBLAS reads for a bound layer in `layout`: operand codes as they are
    (tile-major or not), tiled ones from the canonical copy that A/B mode keeps."""
    return layout if layout in OPERAND_LAYOUTS else "canonical"


def bound_layout(w: Int4Weight, config: Config | None = None) -> str:
    """The layout a layer bound now keeps its codes in for the kernels (int4_layouts). Weights with
    float offsets (GGUF) and fixed configurations the layout does not fit keep the canonical one."""
    n, k = w.out_features, w.in_features
    if settings.CODE_MODE == "tiled" and tileable(n, k):
        return "tiled"
    if (settings.CODE_MODE == "operand" and operand_fits(k, w.group_size) and w.offsets is None
            and (config is None or operand_config(config, w.group_size))):
        return "operand-tiled" if settings.OPERAND_TILED and tileable(n, k) else "operand"
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

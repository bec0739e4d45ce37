"""Triton INT4 x BF16/FP16 matmul with fused dequantization (weight-only, group-wise).

It reads the canonical Int4Weight directly (uint8 [N, K/2], low nibble = even column):
each K-tile is split into its even and odd columns, so the two nibbles of a byte meet
the even and odd activations in two dots, with no interleave.

Two regimes, one kernel:
  decode  (small M) memory-bound: every weight byte is read once; split-K spreads a layer
          over all SMs; fp32 partials meet in a workspace with atomics.
  prefill (large M) tensor cores: large M tiles amortise the dequantization.
The configuration is chosen per (M bucket, N, K, group, dtype) by timing candidates once;
choices are cached on disk so a second run does not retune.

Imported lazily: the package works without Triton.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl

from quantbridge.packed import Int4Weight

KERNEL_NAME = "quantbridge.triton"


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, ws_ptr,
    M, N, K, NGROUPS, stride_xm, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    mask_m = offs_m < M
    mask_n = offs_n < N
    K2 = K // 2

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_start = pid_k * per_split
    # Tiles past K (in the last split) are fully masked below: they load nothing.
    t_end = t_start + per_split

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = qw_ptr + offs_n[:, None] * K2
    for t in range(t_start, t_end):
        kb = t * HALF + offs_h  # byte column
        mask_k = kb < K2
        p = tl.load(w_rows + kb[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        if BLOCK_K <= GROUP:
            # The whole tile lies in one group: one scale and zero per output row.
            g = (t * BLOCK_K) // GROUP
            s = tl.load(s_ptr + offs_n * NGROUPS + g, mask=mask_n, other=0.0)[:, None]
            z = tl.load(z_ptr + offs_n * NGROUPS + g, mask=mask_n, other=0)[:, None].to(tl.int16)
        else:
            g = (2 * kb) // GROUP
            sz_mask = mask_n[:, None] & mask_k[None, :]
            s = tl.load(s_ptr + offs_n[:, None] * NGROUPS + g[None, :], mask=sz_mask, other=0.0)
            z = tl.load(z_ptr + offs_n[:, None] * NGROUPS + g[None, :], mask=sz_mask, other=0).to(tl.int16)
        w_lo = ((p & 0xF).to(tl.int16) - z).to(s.dtype) * s
        w_hi = ((p >> 4).to(tl.int16) - z).to(s.dtype) * s
        xmask = mask_m[:, None] & mask_k[None, :]
        x_even = tl.load(x_rows + 2 * kb[None, :], mask=xmask, other=0.0)
        x_odd = tl.load(x_rows + 2 * kb[None, :] + 1, mask=xmask, other=0.0)
        if BLOCK_M == 1:
            # One token: a reduction on CUDA cores beats a padded tensor-core tile.
            acc += tl.sum(w_lo.to(tl.float32) * x_even.to(tl.float32), axis=1)[None, :]
            acc += tl.sum(w_hi.to(tl.float32) * x_odd.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x_even, tl.trans(w_lo.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(w_hi.to(x_odd.dtype)), acc)

    out_mask = mask_m[:, None] & mask_n[None, :]
    o_off = offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask, sem="relaxed")


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
Config = tuple[int, int, int, int, int, int]


def candidate_configs(m: int, n: int, k: int, group: int) -> list[Config]:
    """The search space for one shape: small-M tiles with split-K, or large tensor-core tiles."""
    out: list[Config] = []
    if m == 1:
        for bn in (16, 32, 64):
            for bk in (128, 256, 512):
                for sk in (1, 2, 4, 8):
                    for warps in (2, 4):
                        out.append((1, bn, bk, sk, warps, 3))
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        for bn in (32, 64, 128):
            for bk in (64, 128, 256):
                for sk in (1, 2, 4, 8):
                    for warps in (4,):
                        out.append((bm, bn, bk, sk, warps, 3))
    else:
        for bm in (64, 128):
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    for warps, stages in ((4, 3), (8, 3), (8, 4)):
                        out.append((bm, bn, bk, 1, warps, stages))
    # Tiles that do not fit the problem only waste work; keep at least one candidate.
    keep = [c for c in out if c[2] // 2 <= max(k // 2, 16) and (k // c[2]) >= c[3]]
    return keep or out[:1]


def m_bucket(m: int) -> int:
    """Shapes within a bucket share a configuration: next power of two, capped at 4096."""
    b = 1
    while b < m and b < 4096:
        b *= 2
    return b


def launch(x2: torch.Tensor, w: Int4Weight, out: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Run the kernel on a 2-D, contiguous x with a given configuration."""
    bm, bn, bk, sk, warps, stages = cfg
    m, k = x2.shape
    n = w.out_features
    ngroups = k // w.group_size
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), sk)
    ws = torch.zeros((m, n), device=x2.device, dtype=torch.float32) if sk > 1 else out
    _int4_matmul_kernel[grid](
        x2, w.qweight, w.scales, w.zeros, out, ws,
        m, n, k, ngroups, x2.stride(0), out.stride(0),
        GROUP=w.group_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
        num_warps=warps, num_stages=stages,
    )
    if sk > 1:
        out.copy_(ws)
    return out


class _Tuner:
    """Picks a configuration per shape by timing every candidate once; remembers it on disk."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table: dict[str, list[int]] = {}
        self.path: Path | None = None

    def _file(self, device: torch.device) -> Path:
        from quantbridge.models import cache_dir

        name = torch.cuda.get_device_name(device).replace(" ", "_")
        return cache_dir() / f"triton-int4-{name}-triton{triton.__version__}.json"

    def _load(self, device: torch.device) -> None:
        path = self._file(device)
        if self.path != path:
            self.path = path
            self.table = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        from quantbridge.results import write_atomic

        write_atomic(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def config(self, x2: torch.Tensor, w: Int4Weight) -> Config:
        m, k = x2.shape
        n = w.out_features
        if os.environ.get("TRITON_INTERPRET") == "1" or not x2.is_cuda:
            # The interpreter checks correctness, not speed: take the first valid candidate.
            return candidate_configs(m_bucket(m), n, k, w.group_size)[0]
        key = f"m{m_bucket(m)}-n{n}-k{k}-g{w.group_size}-{str(x2.dtype).removeprefix('torch.')}"
        with self.lock:
            self._load(x2.device)
            if key not in self.table:
                self.table[key] = list(self._search(x2, w, m_bucket(m)))
                self._save()
            return tuple(self.table[key])  # type: ignore[return-value]

    @staticmethod
    def _search(x2: torch.Tensor, w: Int4Weight, mb: int) -> Config:
        m, k = x2.shape
        xb = torch.randn((mb, k), device=x2.device, dtype=x2.dtype)
        out = torch.empty((mb, w.out_features), device=x2.device, dtype=x2.dtype)
        best, best_t = None, float("inf")
        for cfg in candidate_configs(mb, w.out_features, k, w.group_size):
            try:
                t = triton.testing.do_bench(lambda: launch(xb, w, out, cfg), warmup=5, rep=20, return_mode="median")
            except (triton.runtime.errors.OutOfResources, RuntimeError):
                continue  # too much shared memory or registers for this tile: not a candidate
            if t < best_t:
                best, best_t = cfg, t
        if best is None:
            raise RuntimeError(f"no Triton configuration runs for M={mb}, N={w.out_features}, K={k}")
        return best


TUNER = _Tuner()


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with the Triton kernel; x is [..., K] in fp16 or bf16 (fp32 in the interpreter)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if w.scales.dtype != x2.dtype:
        raise TypeError(f"scales are {w.scales.dtype} but activations are {x2.dtype}; quantize with the compute dtype")
    out = torch.empty((x2.shape[0], w.out_features), device=x2.device, dtype=x2.dtype)
    if x2.shape[0]:
        launch(x2, w, out, config or TUNER.config(x2, w))
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], w.out_features)

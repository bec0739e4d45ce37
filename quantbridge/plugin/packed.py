"""Int4Weight: the canonical packed INT4 weight that every format codec maps to and from.

Layout (for a linear layer with weight W of shape [N, K]):
  qweight  uint8 [N, K/2]   two 4-bit codes per byte; the low nibble holds the even column
  scales   [N, K/g]         in the compute dtype
  zeros    uint8 [N, K/g]   integer zero-points in [0, 15]; w = (q - z) * s (symmetric: z = 8)
  perm     int64 [K] | None act-order: column j of qweight is input feature perm[j]
  offsets  float32 [N, K/g] | None  a float offset per group instead: w = q * s + offset (GGUF
           Q4_1 and Q4_K store weights so; integer zero-points cannot hold them, so only the
           kernels marked `takes_offsets` run such weights, and zeros are then unused)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantbridge.plugin.spec import QuantSpec

MAXQ = 15


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 (any integer dtype) -> uint8 [N, K/2], low nibble = even column."""
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of columns ({q.shape[-1]})")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 [N, K] codes in 0..15."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def unpermute_columns(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """[N, K] columns in storage order -> input-feature order (column j is input perm[j])."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.to(w.device)] = w
    return out


@dataclass
class Int4Weight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int  # the real group length along K (per-channel: K)
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def nbytes(self) -> int:
        """Bytes this weight occupies as stored (codes, scales, zero-points or offsets, permutation)."""
        tensors = [self.qweight, self.scales, self.zeros if self.offsets is None else self.offsets]
        tensors += [self.perm] if self.perm is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] codes, columns in storage (permuted) order."""
        return unpack_int4(self.qweight)

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weight with columns in storage order (what a kernel multiplies x[:, perm] by)."""
        q = self.codes().to(torch.float32)
        s = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        if self.offsets is not None:  # q * s + m, in this order: GGUF's own float32 arithmetic, bit for bit
            return (q * s + self.offsets.to(torch.float32).repeat_interleave(self.group_size, dim=1)).to(dtype)
        z = self.zeros.to(torch.float32).repeat_interleave(self.group_size, dim=1)
        return ((q - z) * s).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weight in the layer's original column order."""
        return unpermute_columns(self.dequantize_stored(dtype), self.perm)

    # Activation smoothing unfolded from the model (AWQ): the layer computes
    # y = (W' (x / in_scale)) / out_scale with W' this weight; None = plain weight.
    in_scale: torch.Tensor | None = None  # [K], input-column order
    out_scale: torch.Tensor | None = None  # [N]
    offsets: torch.Tensor | None = None  # [N, K/g] float: see the module docstring

    @property
    def smoothed(self) -> bool:
        return self.in_scale is not None or self.out_scale is not None

    def plain(self) -> "Int4Weight":
        """The INT4 weight without its smoothing factors (what a checkpoint's layer stores)."""
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm, offsets=self.offsets)

    def to(self, device: torch.device | str) -> "Int4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Int4Weight(move(self.qweight), move(self.scales), move(self.zeros), self.group_size, move(self.perm),
                          move(self.in_scale), move(self.out_scale), move(self.offsets))


def quantize_rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype | None = None,
    perm: torch.Tensor | None = None,
) -> Int4Weight:
    """Round-to-nearest group-wise INT4 quantization of a [N, K] weight.

    Asymmetric: per group s = (max - min) / 15, z = round(-min / s).
    Symmetric: z = 8 and s = 2 * absmax / 15 (the GPTQ convention, so codecs map 1:1).
    `perm` (act-order) reorders columns before grouping; RTN itself has no use for it,
    but GPTQ-style weights carry one and the layout must hold it.
    """
    n, k = weight.shape
    g = spec.group_for(k)
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().to(torch.float32)
    if perm is not None:
        w = w[:, perm]
    wg = w.reshape(n, k // g, g)
    if spec.symmetric:
        absmax = wg.abs().amax(dim=-1)
        scales = (2 * absmax / MAXQ).clamp_min(1e-8)
        zeros = torch.full_like(scales, 8.0)
    else:
        # Include 0 in the range so an all-positive group still represents 0 exactly.
        wmin = wg.amin(dim=-1).clamp(max=0)
        wmax = wg.amax(dim=-1).clamp(min=0)
        scales = ((wmax - wmin) / MAXQ).clamp_min(1e-8)
        zeros = torch.round(-wmin / scales).clamp(0, MAXQ)
    # Round the scale to its storage dtype first, so codes are chosen for the scale actually used.
    scales = scales.to(scale_dtype)
    s32 = scales.to(torch.float32)
    q = torch.round(wg / s32.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, MAXQ)
    return Int4Weight(
        qweight=pack_int4(q.reshape(n, k)),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        group_size=g,
        perm=None if perm is None else perm.to(torch.int64),
    )


def canonical_perm(w: Int4Weight) -> Int4Weight:
    """The same weight with each group's columns in ascending input order.

    Scale and zero-point are per group, so the order inside a group does not change the
    math; formats that record act-order as g_idx (GPTQ, compressed-tensors) keep only the
    group of each column, and decode to this order. Canonicalising first makes every
    codec round trip bit-exact.
    """
    if w.perm is None:
        return w
    k, g = w.in_features, w.group_size
    order = torch.sort(w.perm.reshape(-1, g), dim=1).indices + torch.arange(0, k, g, device=w.perm.device).unsqueeze(1)
    order = order.reshape(-1)
    return Int4Weight(pack_int4(w.codes()[:, order]), w.scales, w.zeros, g, w.perm[order], w.in_scale, w.out_scale,
                      w.offsets)


def cast_scales(w: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """Scales in the compute dtype, as kernels take them (exact for fp16 -> fp32; fp16 -> bf16 rounds)."""
    return Int4Weight(w.qweight, w.scales.to(dtype), w.zeros, w.group_size, w.perm, offsets=w.offsets)

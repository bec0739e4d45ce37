"""GGUF (llama.cpp) INT4 tensors read into canonical Int4Weights, bit-exactly.

Block layouts (`gguf` package, ggml's quants), one row = out-feature, blocks along K:
  Q4_0  32 weights in 18 bytes: d fp16, 16 bytes of nibbles;   w = d * (q - 8)
  Q4_1  32 weights in 20 bytes: d fp16, m fp16, 16 bytes;      w = d * q + m
  Q4_K  256 weights in 144 bytes: d fp16, dmin fp16, 12 bytes of eight 6-bit (scale, min)
        pairs, 128 bytes of nibbles;                           w = (d * sc_j) * q - dmin * m_j
Nibbles: in a 32-weight run, the low nibbles of 16 bytes hold weights 0..15 and the high
nibbles weights 16..31 (Q4_K: each 32-byte run of its 128 bytes holds two sub-blocks).

Q4_0 maps to an integer zero-point of 8. Q4_1 and Q4_K have a float offset per group of 32
(Int4Weight.offsets, w = q * s + m): Q4_K's two-level scales are folded into one float32
scale and offset per sub-block, which is exact (fp16 times a 6-bit integer fits float32's
24-bit mantissa). Dequantizing the result in float32 gives the gguf package's own
`dequantize` bit for bit (tests/test_gguf.py checks every Q4 tensor of the shipped file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, pack_int4

Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
BLOCK_WEIGHTS = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 256}


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins per block (ggml's packing)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode(kind: str, data: np.ndarray, n: int, k: int) -> Int4Weight:
    """A GGUF tensor's raw rows (uint8 [n, k / block * bytes]) as an Int4Weight of shape [n, k]."""
    if kind not in Q4_TYPES:
        raise ValueError(f"{kind} is not a 4-bit GGUF type quantbridge reads ({', '.join(Q4_TYPES)})")
    bw, bb = BLOCK_WEIGHTS[kind], BLOCK_BYTES[kind]
    if k % bw:
        raise ValueError(f"{kind} rows of {k} weights are not whole blocks of {bw}")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // bw, bb)
    f16 = lambda b: b.copy().view(np.float16)[..., 0].astype(np.float32)
    offsets = None
    if kind == "Q4_0":
        d, codes = f16(blocks[..., :2]), _nibbles(blocks[..., 2:])
        scales, zeros = d, np.full_like(d, 8, dtype=np.uint8)
        scale_dtype = torch.float16
    elif kind == "Q4_1":
        d, m, codes = f16(blocks[..., :2]), f16(blocks[..., 2:4]), _nibbles(blocks[..., 4:])
        scales, offsets, zeros = d, m, np.zeros(d.shape, dtype=np.uint8)
        scale_dtype = torch.float16
    else:  # Q4_K: 8 sub-blocks of 32 per 256
        d, dmin = f16(blocks[..., :2]), f16(blocks[..., 2:4])
        sc, mn = _q4k_scale_min(blocks[..., 4:16].reshape(-1, 12))
        sc = sc.reshape(n, k // bw, 8).astype(np.float32)
        mn = mn.reshape(n, k // bw, 8).astype(np.float32)
        qs = blocks[..., 16:].reshape(n, k // bw, 4, 32)  # 32-byte runs: sub-blocks 2i (low) and 2i+1 (high)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // bw, 8, 32)
        scales = (d[..., None] * sc).reshape(n, -1)  # float32 products, exactly as ggml computes them
        offsets = (-(dmin[..., None] * mn)).reshape(n, -1)  # a - b == a + (-b) in IEEE arithmetic
        zeros = np.zeros(scales.shape, dtype=np.uint8)
        codes = codes.reshape(n, k // 32, 32)
        scale_dtype = torch.float32
    q = torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k)))
    to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a.reshape(n, k // 32))).to(dt)
    return Int4Weight(pack_int4(q), to(scales, scale_dtype), to(zeros, torch.uint8), 32,
                      offsets=None if offsets is None else to(offsets, scale_dtype))


def permute_rows(w: Int4Weight, order: torch.Tensor) -> Int4Weight:
    """The same weight with its output rows reordered (exact: rows are independent)."""
    pick = lambda t: None if t is None else t[order].contiguous()
    return Int4Weight(pick(w.qweight), pick(w.scales), pick(w.zeros), w.group_size, w.perm, offsets=pick(w.offsets))


def open_gguf(path: Path):
    """The gguf package's reader on `path`, checked: a truncated or corrupt file is a one-line error naming it.

    Every GGUF read goes through here (the model loader, the gguf quantizer, the llama.cpp row),
    so a damaged file is never a struct.error or a numpy IndexError from deep inside a parser.
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        size = path.stat().st_size
        reader = GGUFReader(str(path))
    except OSError as e:
        raise UserError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - the parser meets arbitrary bytes: whatever it raises means "damaged"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is truncated or corrupt ({size} bytes, not a whole GGUF file: {why}); "
                        f"re-download or re-convert it") from None
    for t in reader.tensors:  # the header may be whole while the tensor data after it is cut short
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise UserError(f"{path} is truncated or corrupt: tensor {t.name} needs bytes up to {end}, the file has "
                            f"{size}; re-download or re-convert it")
    return reader

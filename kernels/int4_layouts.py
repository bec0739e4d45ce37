"""Where the native kernel finds each code: the canonical layout and two load-time re-layouts.

The canonical Int4Weight (uint8 [N, K/2]; column 8i + j in nibble j of int32 word i) is the
interchange form every format converts to and from. A bound layer keeps its codes re-laid for
the kernels, converted once when the layer is bound, bit-exactly reversible:
  "tiled"    the same words, tile-major: TILE_ROWS x TILE_WORDS words (4 KB) contiguous, so a
             warp's 16-byte loads over 8 rows read 512 contiguous bytes.
  "operand"  the same word positions, the nibbles inside each OPERAND_COLUMNS-column chunk of a
             row permuted so that a word's eight codes, dequantized in registers, are already
             where the tensor-core instruction wants them as its register operand (16-bit
             operands, kWidth 2: a thread holds columns 2l, 2l+1, 2l+8, 2l+9, and the same + 16,
             for l = its lane mod 4). Triton then feeds the dequantized tile to wgmma from
             registers, with no round trip through shared memory (benchmarks/NOTES.md).
  "operand-tiled"  the operand layout's words stored tile-major as "tiled" does: whole 32-column
             chunks stay inside one tile row, so the permutation and the tiling compose, and a
             64x128 operand tile (64 rows x 16 words) is 4 KB read in one contiguous run instead
             of 64 runs of 64 bytes at the row stride.
"""

from __future__ import annotations

import torch

TILE_ROWS, TILE_WORDS = 64, 16
OPERAND_COLUMNS = 32  # four int32 words


def tileable(n: int, k: int) -> bool:
    """Whether an [n, k] weight divides into whole tiles."""
    return n % TILE_ROWS == 0 and k % (8 * TILE_WORDS) == 0


def to_tiled(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] codes -> the same bytes tile-major (same shape and dtype)."""
    n, half = qweight.shape
    if not tileable(n, 2 * half):
        raise ValueError(f"a {n}x{2 * half} weight is not whole {TILE_ROWS}x{8 * TILE_WORDS} tiles")
    words = qweight.contiguous().view(torch.int32)
    tiles = words.reshape(n // TILE_ROWS, TILE_ROWS, half // 4 // TILE_WORDS, TILE_WORDS).permute(0, 2, 1, 3)
    return tiles.contiguous().view(torch.uint8).reshape(n, half)


def from_tiled(tiled: torch.Tensor) -> torch.Tensor:
    """to_tiled's inverse."""
    n, half = tiled.shape
    tiles = tiled.contiguous().view(torch.int32).reshape(n // TILE_ROWS, half // 4 // TILE_WORDS, TILE_ROWS, TILE_WORDS)
    return tiles.permute(0, 2, 1, 3).contiguous().view(torch.uint8).reshape(n, half)


def operand_source() -> torch.Tensor:
    """For position p = 8i + j of a chunk (word i, nibble j = 4c + 2b + a): the chunk column it
    holds, 16a + 8b + 2i + c. Nibbles j and j + 4 hold columns 2i + 16a + 8b and the one after:
    one register pair of the operand. The kernel's dequant_operand undoes exactly this."""
    p = torch.arange(OPERAND_COLUMNS)
    i, j = p // 8, p % 8
    c, b, a = j // 4, (j // 2) % 2, j % 2
    return 16 * a + 8 * b + 2 * i + c


def operand_fits(k: int, group: int) -> bool:
    """Whether a weight can take the operand layout: whole chunks, and groups that hold whole
    64-column tiles (the kernel applies one scale per row and tile; 64 is its smallest tile)."""
    return k % OPERAND_COLUMNS == 0 and group % 64 == 0


def _permute_columns(qweight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n, half = qweight.shape
    if (2 * half) % OPERAND_COLUMNS:
        raise ValueError(f"K = {2 * half} is not whole {OPERAND_COLUMNS}-column chunks")
    q = qweight.contiguous()
    codes = torch.stack((q & 0xF, q >> 4), dim=-1).reshape(n, -1, OPERAND_COLUMNS)  # canonical: low nibble first
    codes = codes[:, :, index.to(q.device)].reshape(n, half, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)


def to_operand(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] codes -> the operand layout (same shape and dtype)."""
    return _permute_columns(qweight, operand_source())


def from_operand(laid: torch.Tensor) -> torch.Tensor:
    """to_operand's inverse."""
    return _permute_columns(laid, torch.argsort(operand_source()))


def to_operand_tiled(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K/2] codes -> the operand layout, tile-major (same shape and dtype)."""
    return to_tiled(to_operand(qweight))


def from_operand_tiled(laid: torch.Tensor) -> torch.Tensor:
    """to_operand_tiled's inverse."""
    return from_operand(from_tiled(laid))


RELAYOUTS = {"tiled": (to_tiled, from_tiled), "operand": (to_operand, from_operand),
             "operand-tiled": (to_operand_tiled, from_operand_tiled)}
OPERAND_LAYOUTS = ("operand", "operand-tiled")  # the codes dequant_operand reads
TILED_LAYOUTS = ("tiled", "operand-tiled")  # words stored tile-major (the kernels' TILED addressing)


def relayout(qweight: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Codes laid out as `src` -> laid out as `dst` ("canonical" or one of RELAYOUTS)."""
    if src == dst:
        return qweight
    canonical = qweight if src == "canonical" else RELAYOUTS[src][1](qweight)
    return canonical if dst == "canonical" else RELAYOUTS[dst][0](canonical)


def split_sz_rows(groups: int) -> int:
    """Rows of the split packing of scales and zero points (int4_triton.pack_scales_zeros): a word of
    two groups' scales and a word of eight groups' zero points per weight row."""
    return -(-groups // 2) - (-groups // 8)


def sz_format(sz: torch.Tensor | None, n: int, groups: int) -> int:
    """How the tiles read packed scales and zero points (their SZ_PACKED): 0, none (the weight's
    own); 1, one int32 per row and group, [N, groups]; 2, the split words, [split_sz_rows, N]. Told
    apart by shape."""
    if sz is None:
        return 0
    if tuple(sz.shape) == (n, groups):
        return 1
    if tuple(sz.shape) == (split_sz_rows(groups), n):
        return 2
    raise ValueError(f"packed scales of shape {tuple(sz.shape)} fit neither [N, groups] = [{n}, {groups}] "
                     f"nor the split [{split_sz_rows(groups)}, {n}] (pack_scales_zeros)")

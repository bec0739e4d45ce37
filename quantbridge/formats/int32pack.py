"""Eight 4-bit codes per int32 word, in a given nibble order, along the last dimension."""

from __future__ import annotations

import torch

SEQUENTIAL = (0, 1, 2, 3, 4, 5, 6, 7)


def pack_nibbles(codes: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """uint8 codes [..., 8m] -> int32 [..., m]; nibble i (bits 4i..4i+3) holds element order[i]."""
    if codes.shape[-1] % 8:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into int32 words (needs a multiple of 8)")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    word = torch.zeros(c.shape[:-1], dtype=torch.int64, device=codes.device)
    for i, src in enumerate(order):
        word |= c[..., src] << (4 * i)
    # Words are unsigned 32-bit patterns; store them as the int32 with the same bits.
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """int32 [..., m] -> uint8 codes [..., 8m]; the inverse of pack_nibbles."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed INT4 words must be int32, got {words.dtype}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*words.shape, 8, dtype=torch.uint8, device=words.device)
    for i, dst in enumerate(order):
        out[..., dst] = ((w >> (4 * i)) & 0xF).to(torch.uint8)
    return out.reshape(*words.shape[:-1], -1)


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Act-order as a storage permutation: input columns sorted by group (stable).

    None when g_idx is the trivial k // group_size. Raises if a group does not hold exactly
    `group_size` columns (no permutation then makes groups contiguous).
    """
    k = g_idx.numel()
    g_idx = g_idx.to(torch.int64)
    trivial = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx, trivial):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], trivial):
        raise ValueError(f"g_idx does not assign exactly {group_size} columns to every group")
    return perm


def g_idx_from_perm(perm: torch.Tensor | None, k: int, group_size: int, device) -> torch.Tensor:
    """g_idx[input column] = its group; the inverse view of perm_from_g_idx."""
    groups = torch.arange(k, device=device, dtype=torch.int32) // group_size
    if perm is None:
        return groups
    g_idx = torch.empty_like(groups)
    g_idx[perm] = groups
    return g_idx


def to_input_order(codes: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """[N, K] codes from storage order (column j = input perm[j]) to input-column order."""
    if perm is None:
        return codes
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def check_canonical_perm(perm: torch.Tensor | None, group_size: int) -> None:
    """Formats that record act-order as g_idx keep only which group a column is in, so the
    canonical perm lists each group's columns in ascending order (what decoding yields)."""
    if perm is None:
        return
    g = perm.reshape(-1, group_size)
    if not torch.equal(g, torch.sort(g, dim=1).values):
        raise ValueError("perm is not canonical (each group's columns must be ascending); use packed.canonical_perm")

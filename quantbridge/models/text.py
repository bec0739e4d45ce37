"""Inputs for measurement: real text, tokenised, cut into decode- and prefill-shaped batches.

The shipped text is the Python Language Reference (pydoc topics of CPython 3.11, PSF
licence): real English prose that needs no dataset hub. Its first 90 % is the
calibration split, the last 10 % the held-out evaluation split.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import torch

from quantbridge.models.textfile import read_text_prefix
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.quantizer import Calibration

HOLDOUT_FRACTION = 0.1


@lru_cache(maxsize=1)
def shipped_text() -> str:
    return resources.files("quantbridge").joinpath("data/python_reference.txt").read_text(encoding="utf-8")


def text_split(split: str) -> str:
    """'calib' or 'eval' part of the shipped text, cut at a paragraph boundary."""
    text = shipped_text()
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HOLDOUT_FRACTION)))
    if split == "calib":
        return text[:cut]
    if split == "eval":
        return text[cut:].lstrip()
    raise ValueError(f"unknown split {split!r}; use 'calib' or 'eval'")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids for `text` (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokens: torch.Tensor, rows: int, cols: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` distinct [rows, cols] batches of consecutive tokens at seeded random offsets.

    Distinct batches per timed run, so no run reuses another's activations.
    """
    need = rows * cols
    if tokens.numel() < need:
        raise ValueError(f"text has {tokens.numel()} tokens, a [{rows}, {cols}] batch needs {need}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - cols + 1, (count, rows), generator=gen)
    offs = torch.arange(cols)
    return [tokens[(s.unsqueeze(1) + offs)] for s in starts]


def decode_batches(tokens: torch.Tensor, m: int, count: int, seed: int) -> list[torch.Tensor]:
    """Decode-shaped steps: M sequences of one token each, so every linear sees [M, K]."""
    return windows(tokens, m, 1, count, seed)


def prefill_batches(tokens: torch.Tensor, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """Prefill-shaped steps: one sequence of `length` tokens, so every linear sees [length, K]."""
    return windows(tokens, 1, length, count, seed)


# Reading a user's text file: a prefix of about this many bytes per token wanted, grown while it
# holds too few tokens (a 50 MB file is never read and tokenised whole for 512 tokens).
BYTES_PER_TOKEN = 8
MIN_PREFIX_BYTES = 1 << 16
TOKEN_MARGIN = 4  # tokens read per token used: random windows still have room to differ


def file_tokens(tokenizer, path: str, option: str, want: int) -> torch.Tensor:
    """Tokens of the start of a UTF-8 text file: at least `want` where the file has that many.

    Reads a bounded prefix (strictly decoded, textfile.read_text_prefix), grown fourfold until
    it holds `want` tokens or is the whole file; the caller checks the count it needs.
    """
    nbytes = max(MIN_PREFIX_BYTES, want * BYTES_PER_TOKEN)
    while True:
        text, whole = read_text_prefix(path, option, nbytes)
        tokens = tokenize(tokenizer, text)
        if whole or tokens.numel() >= want:
            return tokens
        nbytes *= 4


def calibration_tokens(tokenizer, samples: int, length: int, path: str | None = None) -> torch.Tensor:
    """The tokens calibration windows are cut from; refused in one line when fewer than `samples` x `length`."""
    need = samples * length  # windows() cuts `samples` rows of `length` tokens from them
    tokens = (tokenize(tokenizer, text_split("calib")) if path is None
              else file_tokens(tokenizer, path, "--calib", TOKEN_MARGIN * need))
    if tokens.numel() < need:
        where = f"--calib {path}" if path else "the shipped calibration split"
        raise UserError(f"{where} has {tokens.numel()} tokens, fewer than --calib-len {length} x --calib-samples "
                        f"{samples} = {need}, what calibration needs; give a longer --calib file or smaller values")
    return tokens


def calibration(tokenizer, samples: int, length: int, path: str | None = None, seed: int = 0) -> Calibration:
    """`samples` windows of `length` tokens from the calibration split (or the start of a user's text file)."""
    tokens = calibration_tokens(tokenizer, samples, length, path)  # refuses a missing, binary or short file
    ids = windows(tokens, samples, length, 1, seed)[0]
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    return Calibration(ids, digest, tokenizer)


def step_token_limit(tokenizer) -> int:
    """Tokens of the shipped held-out split: decode and prefill inputs are windows cut from it.

    workloads.decode_batches(tokens, M, ...) needs M tokens (M sequences of one token) and
    prefill_batches(tokens, L, ...) needs L (one sequence of L tokens), so the largest M and
    the largest prefill length are both this count.
    """
    return int(tokenize(tokenizer, text_split("eval")).numel())


def check_step_sizes(batches: list[int], prefill: int, limit: int) -> None:
    """Refuse a --batch or --prefill larger than the tokens the timing inputs are cut from."""
    over = [m for m in batches if m > limit]
    if over:
        raise UserError(f"--batch {over[0]} is above the {limit} tokens of the shipped evaluation text that decode "
                        f"inputs are cut from; use --batch values of at most {limit}")
    if prefill > limit:
        raise UserError(f"--prefill {prefill} is above the {limit} tokens of the shipped evaluation text that "
                        f"prefill inputs are cut from; use --prefill {limit} or less")


def check_calibration(tokenizer, calib_file: str | None, calib_len: int, calib_samples: int = 1) -> int:
    """Refuse a calibration text shorter than calibration needs (--calib-samples x --calib-len tokens)
    before gptq/awq runs; return its token count (of the prefix read: workloads.calibration_tokens)."""
    return int(calibration_tokens(tokenizer, calib_samples, calib_len, calib_file).numel())

"""Inputs for measurement: real text, tokenised, cut into decode- and prefill-shaped batches.

The shipped text is the Python Language Reference (pydoc topics of CPython 3.11, PSF
licence): real English prose that needs no dataset hub. Its first 90 % is the
calibration split, the last 10 % the held-out evaluation split.
"""

from __future__ import annotations

import codecs
import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

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

    Reads a bounded prefix (strictly decoded, preflight.read_text_prefix), grown fourfold until
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


# What the checks before the model loads read of --eval-text / --calib: enough to refuse a binary
# or non-UTF-8 file at once, without reading a large file whole (only a prefix of it is used).
TEXT_CHECK_BYTES = 1 << 20


def read_text_strict(path: str | Path, option: str = "--eval-text", max_bytes: int | None = None) -> str:
    """A text file (its first `max_bytes` bytes, or the whole file) decoded as UTF-8, refusing binary
    or otherwise non-UTF-8 files.

    compare reads --eval-text through this (not with errors="replace"), so perplexity is never
    measured on replacement characters without a word.
    """
    return read_text_prefix(path, option, max_bytes)[0]


def read_text_prefix(path: str | Path, option: str, max_bytes: int | None) -> tuple[str, bool]:
    """(the text of the file's first `max_bytes` bytes, whether that is the whole file), decoded strictly.

    A prefix ends at its last whitespace, so it never ends inside a character or a word.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{option} file {str(path)!r} does not exist; pass a UTF-8 text file to {option}")
    with open(p, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
        whole = max_bytes is None or len(data) < max_bytes or not f.read(1)
    try:
        # An incomplete character at the end of a prefix is held back, not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=whole)
    except UnicodeDecodeError as e:
        bad = _replaced(data)
        raise UserError(f"{option} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, "
                        f"{bad} undecodable sequence(s)); convert it, e.g. iconv -f latin1 -t utf-8") from None
    if "\x00" in text:
        raise UserError(f"{option} {path} holds NUL bytes, so it is binary, not text; pass a UTF-8 text file")
    if not whole:
        cut = max(text.rfind(c) for c in " \n\t\r")
        text = text[:cut] if cut > 0 else text
    if whole and not text.strip():
        raise UserError(f"{option} {path} is empty; pass a UTF-8 text file with some prose in it")
    return text, whole


def _replaced(data: bytes) -> int:
    """How many undecodable byte sequences errors="replace" would turn into U+FFFD."""
    return data.decode("utf-8", errors="replace").count("\ufffd") - data.count("\ufffd".encode())

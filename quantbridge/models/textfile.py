"""Text files a user passes (--eval-text, --calib) read strictly: UTF-8 or a one-line error, before any work.

Plain Python on purpose: the command line checks these files before it loads torch.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from quantbridge.plugin.errors import UserError

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

"""Checks of compare's settings that can fail before any measuring work starts.

Each function takes plain values (a pattern, a path, a tokenizer, token counts) and raises
UserError with one line naming the fix, so a bad setting is found in the first second, not
after the reference run. cli.py calls them before the comparer is built; the ones that need
the tokenizer right after the model is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from quantbridge.plugin.errors import UserError


def check_skip(pattern: str, option: str = "--skip") -> re.Pattern:
    """The compiled `--skip` regex, or a one-line error naming what is wrong with it."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{option} {pattern!r} is not a valid regular expression ({e}); "
                        rf"escape special characters, e.g. --skip '(^|\.)lm_head$'") from None


def skip_targets(layers: Iterable[str], pattern: str, model: str, option: str = "--skip") -> list[str]:
    """The layers left to quantize once `pattern` is skipped; none left is refused here, before any
    work (every row would otherwise measure nothing and fail on its first division)."""
    layers = list(layers)
    skip = check_skip(pattern, option)
    targets = [n for n in layers if not skip.search(n)]
    if layers and not targets:
        raise UserError(f"{option} {pattern!r} matches every linear layer of {model} ({len(layers)}): nothing left "
                        rf"to quantize; narrow the pattern, e.g. the default {option} '(^|\.)lm_head$'")
    return targets


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
    import codecs

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


def check_plan_file(path: str | Path) -> dict:
    """A plan file read and checked (delegates to plan.load_plan, which refuses non-JSON files)."""
    from quantbridge.results.plan import load_plan

    return load_plan(str(path))


def step_token_limit(tokenizer) -> int:
    """Tokens of the shipped held-out split: decode and prefill inputs are windows cut from it.

    workloads.decode_batches(tokens, M, ...) needs M tokens (M sequences of one token) and
    prefill_batches(tokens, L, ...) needs L (one sequence of L tokens), so the largest M and
    the largest prefill length are both this count.
    """
    from quantbridge.models.text import text_split, tokenize

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
    from quantbridge.models.text import calibration_tokens

    return int(calibration_tokens(tokenizer, calib_samples, calib_len, calib_file).numel())

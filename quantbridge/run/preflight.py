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

from quantbridge.models.text import TEXT_CHECK_BYTES, calibration_tokens, read_text_strict, text_split, tokenize
from quantbridge.plugin.errors import UserError
from quantbridge.results.plan import load_plan

__all__ = ["TEXT_CHECK_BYTES", "read_text_strict"]  # the text checks live with the text (models.text)


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


def check_plan_file(path: str | Path) -> dict:
    """A plan file read and checked (delegates to plan.load_plan, which refuses non-JSON files)."""
    return load_plan(str(path))


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

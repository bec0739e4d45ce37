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
from quantbridge.results.plan import load_plan


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

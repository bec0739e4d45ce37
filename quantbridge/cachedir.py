"""Where quantbridge keeps what it builds once: the demo and tiny models, tuned kernel configs, quantized weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("QUANTBRIDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantbridge"
    )
    return Path(root)

"""Where quantbridge keeps what it builds once: the demo and tiny models, tuned kernel configs, quantized weights."""

from __future__ import annotations

import os
from pathlib import Path


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """save_pretrained of model and tokenizer into `path`, atomically: written beside it, then
    renamed; if another process finished first, theirs is kept."""
    import shutil

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def cache_dir() -> Path:
    root = os.environ.get("QUANTBRIDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantbridge"
    )
    return Path(root)

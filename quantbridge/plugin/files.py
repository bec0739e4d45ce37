"""Where adapters and kernels keep what they build once (tuned configurations, compiled extensions),
and how every result file is written: atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """quantbridge's cache directory: QUANTBRIDGE_CACHE, else XDG_CACHE_HOME/quantbridge (not created here)."""
    root = os.environ.get("QUANTBRIDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "quantbridge"
    )
    return Path(root)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (or bytes: a figure) so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; a result file gets the usual mode
        with (os.fdopen(fd, "wb") if isinstance(data, bytes) else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

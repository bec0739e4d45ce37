"""Where quantbridge keeps what it builds once: the demo and tiny models, tuned kernel configs, quantized weights."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from quantbridge.files import faults
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import cache_dir


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """save_pretrained of model and tokenizer into `path`, atomically: written beside it, then
    renamed; if another process finished first, theirs is kept."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a write that failed, or a signal: our half-written copy goes
        shutil.rmtree(tmp, ignore_errors=True)
        cause = faults.os_error_of(e) if isinstance(e, Exception) else None  # safetensors: "(os error 28)"
        if cause is None:
            raise
        if not (path / "config.json").exists():  # not another process's finished copy: a write that failed
            raise UserError(f"cannot write {path} in quantbridge's cache: {faults.describe(cause)}") from None
    return path


def check_cache_dir() -> Path:
    """The cache directory, created and tried (a file written and renamed in it) before any work;
    a one-line error naming QUANTBRIDGE_CACHE when it is a file, below a file, or not writable."""
    root = cache_dir().expanduser()
    named = (f"QUANTBRIDGE_CACHE={os.environ['QUANTBRIDGE_CACHE']}" if os.environ.get("QUANTBRIDGE_CACHE")
             else f"quantbridge's cache directory {root}")
    fix = "set QUANTBRIDGE_CACHE to a directory you can write to"
    if root.is_symlink() and not root.exists():
        raise UserError(f"{named} is a symbolic link to {os.readlink(root)}, which does not exist; {fix}")
    if root.exists() and not root.is_dir():
        raise UserError(f"{named} is a file, not a directory; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        faults.probe_dir(root, 1 << 20)  # room for a little: a full disk or `ulimit -f` shows now
    except OSError as e:
        if e.errno == errno.ENOTDIR or (e.errno == errno.EEXIST and not root.is_dir()):
            raise UserError(f"{named} is below a file, not a directory ({e.filename or root}); {fix}") from None
        raise UserError(f"{named} cannot be written: {e.strerror or e} ({errno.errorcode.get(e.errno, '?')}); "
                        f"{faults.os_error_hint(e)}; or {fix}") from None
    return root

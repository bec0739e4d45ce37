"""Output directories: which ones quantbridge refuses to write into, and how one replaces another in one step."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import cache_dir


def refuse_unsafe(out: Path, option: str, example: str = "runs/demo") -> None:
    """Refuse /, the home directory, the current directory or any directory containing it, and
    quantbridge's own cache directory or anything in it."""
    refuse_cache(out, option, example)
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if out == Path(out.anchor):
        raise UserError(f"{option} {out} is the file-system root; choose a new directory, e.g. {example}")
    if out == home:
        raise UserError(f"{option} {out} is your home directory; choose a new directory, e.g. {example}")
    if out == cwd or out in cwd.parents:
        what = "the current directory" if out == cwd else "a directory containing the current directory"
        raise UserError(f"{option} {out} is {what}; choose a new directory, e.g. {example}")


def refuse_cache(out: Path, option: str, example: str = "runs/demo") -> None:
    """Refuse quantbridge's own cache directory and anything in it: what is there is quantbridge's."""
    cache = cache_dir().expanduser().resolve()
    out = out.expanduser().resolve()
    if out == cache or cache in out.parents:
        where = "is" if out == cache else "is in"
        raise UserError(f"{option} {out} {where} quantbridge's cache directory {cache}, which holds what quantbridge "
                        f"builds once (models, quantized weights); choose another place, e.g. {example}")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(new: Path, out: Path) -> Path:
    """Swap directories `new` and `out` (both exist); return where the previous `out` now lies.

    renameat2(RENAME_EXCHANGE) swaps them in one step. Where it is missing (not Linux, an old
    kernel, a file system without it) the previous run is renamed aside first, so at no moment
    is it gone while the new one is not in place.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(out), _RENAME_EXCHANGE) == 0:
            return new
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(out))
    aside = out.with_name(f".{out.name}.previous-{os.getpid()}")
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(aside, out)
        raise
    os.rename(aside, new)  # where an exchange leaves it: nothing hidden stays behind
    return new

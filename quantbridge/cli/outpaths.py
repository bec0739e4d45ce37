"""Output paths checked before any work: a command that would fail writing its result fails first."""

from __future__ import annotations

import errno
from pathlib import Path

from quantbridge.files import faults
from quantbridge.files.outdir import refuse_cache
from quantbridge.plugin.errors import UserError


def check_writable(path: str, option: str, example: str | None = None) -> None:
    """Create the parent of an output file and try there what write_atomic will do (a file written and
    renamed), and that an existing file can be replaced, before any work."""
    p = Path(path).expanduser()
    example = example or f"report.{option[2:]}"
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file path, e.g. {option} {example}")
    refuse_cache(p, option, example)
    try:
        p.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of {option} {path}: {faults.describe(e)}") from None
    try:
        faults.probe_dir(p.resolve().parent, 1 << 16)
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {faults.describe(e)}") from None
    problem = faults.replace_problem(p)
    if problem is not None:
        raise UserError(f"cannot replace {option} {path}: {problem.strerror} "
                        f"({errno.errorcode[problem.errno]}); {faults.os_error_hint(problem)}")


def check_writable_dir(path: str, option: str, example: str) -> Path:
    """An output directory whose files are written one by one (bench): created and tried before any work."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory; choose a directory, e.g. {option} {example}")
    refuse_cache(p, option, example)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {option} {path}: {faults.describe(e)}") from None
    try:
        faults.probe_dir(p, 1 << 20)
    except OSError as e:
        raise UserError(f"cannot write in {option} {path}: {faults.describe(e)}") from None
    return p

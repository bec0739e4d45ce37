"""Faults from outside the run: signals, full disks, file-size limits, places that cannot be written.

- `os_error_hint(e)`: the one errno -> fix table every "could not write" message uses.
- `install()` (the CLI's entry point calls it): SIGINT, SIGTERM and SIGHUP end a command the same
  way, as `Interrupted` (a KeyboardInterrupt), so its cleanup runs and it exits 128 + the signal;
  a second signal while it cleans up is noted, not raised, so the cleanup finishes.
- `deferred_signals()`: a section a signal must not cut in two (swapping a directory into place).
- `probe_dir`, `replace_problem`, `check_tmpdir`: find before any work what the final writes would fail on.
- `stage(name)`: a test hook: with QUANTBRIDGE_TEST_WAIT_AT naming the stage, the process says
  so on stderr and waits there for a signal, so signal tests need not race the run.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantbridge.plugin.errors import UserError

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WAIT_ENV = "QUANTBRIDGE_TEST_WAIT_AT"  # comma-separated stages, waited at in this order, once each
ANNOUNCE = "quantbridge-test: waiting at "


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT, SIGTERM or SIGHUP. `state` may say what it leaves behind."""

    def __init__(self, signum: int = signal.SIGINT, state: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.state = int(signum), state

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def label(self) -> str:
        """How the one-line message starts: Ctrl-C keeps click's word, other signals are named."""
        return "Aborted" if self.signum == signal.SIGINT else f"Stopped by {self.name}"


def as_interrupted(e: BaseException) -> Interrupted:
    """A KeyboardInterrupt as Interrupted (a plain one came from Python's own SIGINT handler)."""
    return e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)


# -- signals -----------------------------------------------------------------------------------

_received: list[int] = []  # every handled signal this process got, in order
_acted = False  # an Interrupted has been raised: later signals only hurry the cleanup
_defer_depth = 0
_pending: list[int] = []  # signals that arrived inside deferred_signals()


def _handler(signum, frame) -> None:
    global _acted
    _received.append(signum)
    if _defer_depth:
        _pending.append(signum)
        return
    if _acted:
        return  # a second Ctrl-C while cleaning up: cleanup finishes, the exit status is the first one's
    _acted = True
    raise Interrupted(signum)


def install() -> None:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted once in this process; later ones are noted only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in HANDLED:
        signal.signal(s, _handler)


def settle() -> None:
    """The command is over: ignore SIGINT, SIGTERM and SIGHUP for the rest of the exit. Python resets its
    handlers to the default late in its shutdown, so a second Ctrl-C then would kill the process and turn
    its exit status (130) into -2; an ignored signal is left ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
    stage("exit", until="input")


def hurry() -> bool:
    """Whether a second signal came: waits in the cleanup (a child's grace period) can be cut short."""
    return len(_received) > 1


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Run the block whole: a signal that arrives inside it is acted on when it ends."""
    global _defer_depth, _acted
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    ours = all(h is _handler for h in previous.values())  # install() ran: its rules hold afterwards
    for s in HANDLED:
        signal.signal(s, _handler)
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if not ours:
            for s, h in previous.items():
                signal.signal(s, h)
        pending = [] if _defer_depth else _pending[:]
        if not _defer_depth:
            _pending.clear()
    if pending and not (ours and _acted):  # when already stopping, it was a second signal: noted only
        _acted = _acted or ours
        raise Interrupted(pending[0])


def stage(name: str, until: str = "signal") -> None:
    """Test hook. With QUANTBRIDGE_TEST_WAIT_AT's next stage equal to `name`, announce it on stderr and
    wait until a signal arrives (the handler raises, or notes it when it must not), or, with
    until="input" (signals are ignored there), until a line arrives on stdin. Nothing otherwise."""
    wanted = [s for s in os.environ.get(WAIT_ENV, "").split(",") if s]
    if not wanted or wanted[0] != name:
        return
    os.environ[WAIT_ENV] = ",".join(wanted[1:])  # each stage once, in the order given
    seen = len(_received)
    os.write(2, f"{ANNOUNCE}{name}\n".encode())
    if until == "input":
        os.read(0, 1)
        return
    deadline = time.monotonic() + 600  # a test that died never sends it: do not wait forever
    while len(_received) == seen and time.monotonic() < deadline:  # the handler runs between sleeps
        time.sleep(0.01)


# -- errno -> what to do -------------------------------------------------------------------------


def _fsize_limit() -> str:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return "the file-size limit"
    return "the file-size limit" if soft == resource.RLIM_INFINITY else f"the file-size limit ({_size(soft)})"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


_HINTS = {
    errno.ENOSPC: "the file system is full: free space there or choose a place with room",
    errno.EDQUOT: "your disk quota is used up: free space, ask for more quota or choose another place",
    errno.EFBIG: None,  # names the current limit: see os_error_hint
    errno.EROFS: "the file system is mounted read-only: choose a place on a writable one",
    errno.EACCES: "permission denied: choose a directory you can write to, or change its permissions",
    errno.EPERM: ("the operation is not permitted: the file or directory is immutable or append-only "
                  "(lsattr shows it; chattr -i / -a clears it) or in a sticky directory owned by someone else; "
                  "choose another place"),
    errno.EBUSY: "a mount point or a directory in use cannot be renamed or replaced: choose a directory inside it",
    errno.EXDEV: ("it is on another file system than the directory beside it (a mount point), so it cannot be "
                  "renamed into place; choose a directory inside it"),
    errno.ENOTDIR: "part of the path is a file, not a directory: fix the path",
    errno.EISDIR: "it is a directory where a file belongs: give a file path",
    errno.ENOENT: "a directory on the path does not exist (or was removed meanwhile): check the path",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter path",
    errno.ELOOP: "the path has a loop of symbolic links: fix the path",
    errno.ENOTEMPTY: "the directory is not empty: choose a new or empty directory",
    errno.EEXIST: "something else already exists there: choose another path",
    errno.EMLINK: "the directory holds too many entries: choose another place",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "the system has too many open files: close some programs and try again",
    errno.EIO: "an input/output error: the disk or network file system failed; check it (dmesg) and try again",
    errno.ETXTBSY: "the file is in use by a running program: stop it or choose another path",
}


def os_error_hint(e: OSError | int) -> str:
    """What to do about an OSError (or an errno), in words that match its errno."""
    code = e if isinstance(e, int) else e.errno
    if code == errno.EFBIG:
        return f"{_fsize_limit()} was reached: raise it (ulimit -f unlimited) or write less"
    return _HINTS.get(code, "choose another place")


def describe(e: OSError) -> str:
    """'No space left on device (ENOSPC); the file system is full: ...' for one-line messages."""
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}{f' ({name})' if name else ''}; {os_error_hint(e) if e.errno else 'choose another place'}"


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, one in its context chain (torch.save's zip writer
    raises RuntimeError over it), or the "(os error 28)" safetensors' Rust writer puts in its message."""
    import re

    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        m = re.search(r"\(os error (\d+)\)", str(seen))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__context__
    return None


class WriteFailed(Exception):
    """A write that failed (disk full, file-size limit, permissions): the path, its OSError and, in
    words, what the file was; str() is one line with the errno's hint."""

    def __init__(self, path: str | os.PathLike, error: OSError, what: str = "") -> None:
        super().__init__(f"{what + ' ' if what else ''}{path}: {describe(error)}")
        self.path, self.error, self.what = Path(path), error, what


def tmpdir_named() -> str:
    """TMPDIR=... when Python's temporary directory is TMPDIR; else which one it is (and that TMPDIR was not)."""
    d, env = tempfile.gettempdir(), os.environ.get("TMPDIR")
    if env and os.path.realpath(env) == os.path.realpath(d):
        return f"TMPDIR={env}"
    return f"the temporary directory {d}" + (f" (TMPDIR={env} is not usable)" if env else "")


def check_tmpdir(nbytes: int = 1 << 20) -> None:
    """Try TMPDIR before any work: the files handed to each row's process are written there."""

    try:
        probe_dir(tempfile.gettempdir(), nbytes)
    except OSError as e:
        raise UserError(f"{tmpdir_named()} cannot hold quantbridge's temporary files: {describe(e)}; "
                        f"or set TMPDIR to another directory") from None


# -- checks before any work ----------------------------------------------------------------------

PROBE_PREFIX = ".quantbridge-probe-"


def probe_dir(d: str | os.PathLike, nbytes: int = 0) -> None:
    """Create a directory in `d` holding a file of `nbytes`, rename it and remove it: what a run's
    staged writes and final rename do there, so they fail now (OSError) rather than at the end."""
    d = Path(d)
    probe = Path(tempfile.mkdtemp(dir=d, prefix=PROBE_PREFIX))
    moved = probe.with_name(probe.name + "-renamed")
    try:
        with open(probe / "probe", "wb") as f:
            chunk = b"\x5a" * min(nbytes, 1 << 20)
            left = nbytes
            while left > 0:
                left -= f.write(chunk[:left])
            f.flush()
        os.rename(probe, moved)
        probe = moved
    finally:
        try:
            (probe / "probe").unlink()
        except FileNotFoundError:
            pass
        os.rmdir(probe)


_FS_IOC_GETFLAGS = 0x80086601
_IMMUTABLE, _APPEND = 0x10, 0x20


def fs_flags(path: str | os.PathLike) -> int:
    """The inode flags lsattr shows (0 where the file system has none)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return 0
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        return int.from_bytes(buf[:4], "little")
    except OSError:
        return 0
    finally:
        os.close(fd)


def replace_problem(path: str | os.PathLike) -> OSError | None:
    """Why an existing file or directory could not be renamed away or replaced, as the OSError that
    rename would raise; None when nothing stands in the way. The parent is probed by probe_dir."""
    p = Path(path)
    if not os.path.lexists(p):
        return None
    if p.is_dir() and not p.is_symlink() and os.path.ismount(p):
        return OSError(errno.EBUSY, "it is a mount point", str(p))
    flags = fs_flags(p)
    if flags & _IMMUTABLE:
        return OSError(errno.EPERM, "it is immutable (chattr +i)", str(p))
    if flags & _APPEND:
        return OSError(errno.EPERM, "it is append-only (chattr +a)", str(p))
    parent = p.parent
    st, pst = os.lstat(p), os.stat(parent)
    euid = os.geteuid()
    if pst.st_mode & stat.S_ISVTX and euid != 0 and euid not in (st.st_uid, pst.st_uid):
        return OSError(errno.EPERM, "it is in a sticky directory and owned by another user", str(p))
    return None

"""The launcher: a unit of work run in this process or in a child process of its own.

    launcher = Launcher.asked("process")                  # --isolation process | none
    outcome = launcher.run("quantbridge.run.bench:bench_backend", job, backends=[...], on_message=...)
    outcome.ok -> outcome.value          (what the unit returned)
    else       -> outcome.failure()       ("the row's process killed by SIGSEGV", "KeyError: ... (in the row's process)")

compare's rows and bench's backends run through it. In this process a unit is called directly
(or `here`, the same work on what this process already holds) and its exceptions propagate: its
own error handling has had its say, and --debug shows the traceback. In a child process
(`run_isolated`) whatever ends the process ends only that unit, and `Outcome.failure` is the one
place that says how, for the unit's `failed` status. Either way the unit's `send(...)` messages
reach the caller's on_message as they are sent.

The child is started with the `spawn` method (a fresh interpreter: never a fork of a parent
that may hold a CUDA context). The function is named by "module:qualname" and imported in
the child after `imports` (modules that register things the function needs, e.g. a backend
defined outside quantbridge) and after registering `backends` that importing did not (a class
registered at run time). Its arguments and its result travel through files written with
torch.save in a private temporary directory that is removed afterwards, so tensors never go
through the pipe; the pipe carries only small messages: the child's `send(...)` calls
(progress), then "returned" or the exception's type, first line and traceback. A child that
ends without either (a signal, os._exit, a crash in native code) is described by its exit
status. Nothing here knows what the function computes.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from quantbridge.files import faults
from quantbridge.plugin import backend as registry
from quantbridge.plugin.errors import UserError

ISOLATION = ("process", "none")  # --isolation: each unit in its own child process, or all in this one

_POLL_S = 0.05
_KILL_GRACE_S = 5.0  # after a timeout: SIGTERM, then SIGKILL if the child is still there

_conn = None  # in a child: the pipe to the parent (for send)
_here: Callable[[Any], None] | None = None  # in this process, while Launcher.run runs a unit: its on_message


@dataclass(frozen=True)
class Outcome:
    """How a unit's run ended: with the function's value, or with the reason it has none (a child's)."""

    value: Any = None
    exitcode: int | None = None  # the process's exit status; negative: killed by that signal
    signal: str | None = None  # "SIGKILL", "SIGSEGV", ... when a signal ended it
    exception: str | None = None  # the type name, when the function raised
    message: str | None = None  # the exception's first line
    traceback: str | None = None
    timed_out: float | None = None  # the timeout in seconds, when the child was stopped for it
    seconds: float = 0.0  # wall time from start to the child's end
    returned: bool = False  # the function returned and its result was handed over (even if the exit was not clean)

    @property
    def ok(self) -> bool:
        return self.returned

    @property
    def reason(self) -> str | None:
        """One line saying how the child died; None when it returned."""
        if self.ok:
            return None
        if self.timed_out is not None:
            return f"timed out after {self.timed_out:g} s (the process was stopped)"
        if self.exception is not None:
            return f"{self.exception}: {self.message}" if self.message else self.exception
        if self.signal is not None:
            return f"killed by {self.signal}"
        return f"exited with code {self.exitcode} before returning a result"

    def failure(self, outside: str | None = None) -> str | None:
        """The reason a unit that did not return records (its status: failed); None when it returned.

        An exception that ended the unit in its child process: "<Type>: <first line> (in the row's
        process)", with ", outside <outside>" for a unit that handles its own errors; whatever
        else ended the process first (a signal, an exit, a timeout): "the row's process <reason>".
        """
        if self.ok:
            return None
        if self.exception is not None:
            return f"{self.reason} (in the row's process{f', outside {outside}' if outside else ''})"
        return f"the row's process {self.reason}"


@dataclass(frozen=True)
class Launcher:
    """Where a run's units of work run: each in a child process of its own, or all in this one."""

    isolated: bool
    how: str  # what results record: "process", "none", or "none (why the units run in this process)"
    env: Mapping[str, str] = field(default_factory=dict)  # set in each child process before any import

    @classmethod
    def asked(cls, isolation: str, here_because: str | None = None,
              env: Mapping[str, str] | None = None) -> Launcher:
        """The launcher `--isolation` asks for; `here_because`: why the units run in this process even so."""
        if isolation not in ISOLATION:
            raise UserError(f"--isolation {isolation!r} is not one of {', '.join(ISOLATION)}")
        if isolation == "none":
            return cls(False, "none")
        if here_because is not None:
            return cls(False, f"none ({here_because})")
        return cls(True, "process", dict(env or {}))

    def run(self, target: str, job: Any, *, here: Callable[[], Any] | None = None, backends: Iterable[str] = (),
            imports: Sequence[str] = (), on_message: Callable[[Any], None] | None = None) -> Outcome:
        """Run the unit `target(job)` ("module:function") and return how it ended.

        In this process `here()` runs instead when given: the same work on what this process
        already holds (a loaded model), which a child process makes again from `job`. `backends`:
        the backends the unit uses, whose classes a child registers where importing did not (one
        registered at run time, by a test say); `imports`: further modules a child imports first.
        """
        if not self.isolated:
            return _run_here(here or partial(resolve(target), job), on_message)
        classes = {n: f"{type(b).__module__}:{type(b).__qualname__}" for n in sorted(backends)
                   for b in [registry.get(n)]}
        modules = sorted({*imports, *(where.partition(":")[0] for where in classes.values())})
        return run_isolated(target, job, imports=modules, env=dict(self.env), backends=classes, on_message=on_message)


def _run_here(fn: Callable[[], Any], on_message: Callable[[Any], None] | None) -> Outcome:
    """`fn()` in this process, its `send`s handed to on_message; an exception propagates."""
    global _here
    outer, _here = _here, on_message
    start = time.monotonic()
    try:
        value = fn()
    finally:
        _here = outer
    return Outcome(value=value, seconds=time.monotonic() - start, returned=True)


def send(message: Any) -> None:
    """In a unit of work: hand a small picklable message to the on_message of whoever launched it
    (through the pipe from a child process, directly in this one). Elsewhere it does nothing."""
    if _conn is not None:
        _conn.send(("message", message))
    elif _here is not None:
        _here(message)


def in_child() -> bool:
    return _conn is not None


@contextmanager
def private_dir(prefix: str = "quantbridge-") -> Iterator[Path]:
    """A temporary directory only this user can read (mode 0700), removed with its files afterwards.

    Its name holds this process's id, so a directory a killed run (SIGKILL, OOM) could not remove is
    recognised as its and removed by the next run that makes one: `remove_orphans`."""
    remove_orphans(prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))  # mkdtemp creates it 0700
    try:
        yield path
    except BaseException:
        faults.stage("temp-cleanup")  # test hook: a second signal while cleaning up
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_orphans(prefix: str) -> list[Path]:
    """Remove `prefix<pid>-*` temporary directories of ours whose process is gone; returns them.

    Only directories quantbridge made: its prefix, a process id, this user's, mode 0700, and that
    process no longer running (a live process with that id, whatever it is, keeps its directory)."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = d.name[len(prefix):].partition("-")[0]
        try:
            st = d.lstat()
        except OSError:
            continue
        if not pid.isdigit() or not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid() \
                or st.st_mode & 0o777 != 0o700 or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into a file we open: a failed write raises OSError with its errno (ENOSPC, EFBIG),
    where torch.save(obj, path) raises a RuntimeError that names neither."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer may fail after, and over, our file's OSError
            cause = faults.os_error_of(e)
            if cause is None:
                raise
            raise cause from None


def load(path: str | os.PathLike) -> Any:
    """What save wrote (our own files, in our own private directory: full unpickling is intended)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def resolve(target: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, qualname = target.partition(":")
    if not module or not qualname:
        raise ValueError(f"target {target!r} is not 'module:function'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def run_isolated(target: str, *args: Any, imports: Sequence[str] = (), env: dict[str, str] | None = None,
                 timeout: float | None = None, on_message: Callable[[Any], None] | None = None,
                 backends: Mapping[str, str] | None = None) -> Outcome:
    """Call `target(*args)` in a spawned child and return how it ended.

    `imports`: modules the child imports first; `env`: variables set in the child before any
    import; `timeout`: seconds before the child is stopped (SIGTERM, then SIGKILL);
    `on_message`: called in the parent, in order, with each message the child `send`s;
    `backends`: name -> "module:qualname" of backend classes the child registers after `imports`
    where importing did not.
    """
    ctx = mp.get_context("spawn")
    start = time.monotonic()
    with private_dir("quantbridge-child-") as tmp:
        args_file, result_file = tmp / "args.pt", tmp / "result.pt"
        save(args, args_file)
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_main, name=f"quantbridge:{target}",
                           args=(target, str(args_file), str(result_file), list(imports), dict(env or {}),
                                 dict(backends or {}), child_end),
                           daemon=True)
        final = None
        timed_out = None
        try:
            with _ctrl_c_blocked():  # inherited: the child never sees the terminal's Ctrl-C; we stop it
                proc.start()
            child_end.close()  # the child holds the only write end: EOF once it is gone
            faults.stage("child-started")  # test hook: a signal while the child starts up
            while True:
                if timeout is not None and time.monotonic() - start > timeout:
                    timed_out = timeout
                    _stop(proc)
                    break
                if not parent_end.poll(_POLL_S):
                    if not proc.is_alive() and not parent_end.poll(0):
                        break
                    continue
                try:
                    kind, payload = parent_end.recv()
                except (EOFError, OSError):  # the child is gone (or closed its end)
                    break
                if kind == "message":
                    if on_message is not None:
                        on_message(payload)
                else:
                    final = (kind, payload)
        except BaseException:  # Ctrl-C or an error in on_message: the child does not outlive us
            _stop(proc)
            raise
        finally:
            parent_end.close()
        proc.join()
        seconds = time.monotonic() - start
        code = proc.exitcode
        if timed_out is not None:
            return Outcome(exitcode=code, signal=signal_name(code), timed_out=timed_out, seconds=seconds)
        if final is not None and final[0] == "returned" and result_file.exists():
            # A child that returned and then died on its way out (a native library's teardown) still
            # handed over a complete result: keep it, with the exit status.
            return Outcome(value=load(result_file), exitcode=code, signal=signal_name(code) if code else None,
                           seconds=seconds, returned=True)
        if final is not None and final[0] == "raised":
            return Outcome(exitcode=code, exception=final[1]["type"], message=final[1]["message"],
                           traceback=final[1]["traceback"], seconds=seconds)
        return Outcome(exitcode=code, signal=signal_name(code), seconds=seconds)


@contextmanager
def _ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while a child is started, so the child starts with it blocked.

    A terminal's Ctrl-C reaches every process of the group; a child still importing would print
    its own KeyboardInterrupt traceback. The parent alone acts on it and stops the child (SIGTERM,
    which the child's cleanup handles). A Ctrl-C meanwhile stays pending here and is acted on after.
    """
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, OSError):  # no pthread_sigmask (not POSIX)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(proc) -> None:
    if not proc.is_alive():
        return
    proc.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    while proc.is_alive() and time.monotonic() < deadline and not faults.hurry():  # a second Ctrl-C: no grace
        proc.join(_POLL_S)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _child_main(target: str, args_file: str, result_file: str, imports: list[str], env: dict[str, str],
                backends: dict[str, str], conn) -> None:
    global _conn
    os.environ.update(env)
    faults.install()  # SIGTERM from the parent's _stop ends the function through its cleanup, as Ctrl-C does
    _conn = conn
    try:
        for module in imports:
            importlib.import_module(module)
        if backends:
            _register(backends)
        fn = resolve(target)
        value = fn(*load(args_file))
        tmp = f"{result_file}.tmp"
        save(value, tmp)
        os.replace(tmp, result_file)  # complete or absent
        conn.send(("returned", None))
    except BaseException as e:  # noqa: BLE001 - the parent records it; SystemExit included
        try:
            conn.send(("raised", {"type": type(e).__name__, "message": _first_line(e),
                                  "traceback": traceback.format_exc()}))
        except Exception:  # noqa: BLE001 - the pipe is gone: the exit status says enough
            pass
    finally:
        conn.close()


def _register(classes: dict[str, str]) -> None:
    """In a child: register the parent's backend classes that importing did not register here
    (one registered at run time, e.g. by a test, rather than as an import's side effect)."""
    known = set(registry.names())
    for name, where in classes.items():
        if name not in known:
            registry.register(resolve(where))

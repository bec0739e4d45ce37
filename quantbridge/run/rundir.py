"""compare's output directory: checked and locked before any work, replaced only by a complete run.

A run writes into a staging directory of its own beside OUT (`OUT.partial`), with its
results after every finished backend. Only when the run is complete (results and report
written) does it take OUT's place, in one atomic exchange of the two directories
(renameat2 RENAME_EXCHANGE on Linux; elsewhere the previous run is renamed aside first and
removed once the new one is in place). An interrupted or failed run leaves OUT as it was
and its finished rows in OUT.partial.

A lock file beside OUT (`.OUT.lock`, flock) keeps a second compare from writing the same
OUT while the first is alive; the kernel drops the lock when the process ends, however it ends.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from quantbridge.files import faults
from quantbridge.files.outdir import exchange, refuse_unsafe
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import write_atomic
from quantbridge.results.schema import save_csv, save_json

MARKER = ".quantbridge-run"  # JSON: status (running, partial, complete), pid, rows
# What a run directory may hold; anything else in an existing OUT means it is not ours to replace.
RUN_FILES = {"results.json", "results.csv", "report.html", "report.md", MARKER}
# results.write_atomic's temporary names for those files (mkstemp: 8 characters of [a-z0-9_]),
# left only by a run killed mid-write; a user's own hidden file never counts as ours.
_ATOMIC_TMP = re.compile(r"\.(%s)\.[a-z0-9_]{8}\.tmp" % "|".join(re.escape(n) for n in sorted(RUN_FILES)))
PROBE_BYTES = 1 << 20  # written once in OUT's parent before any work: a full disk or `ulimit -f` shows now


class RunWriteError(faults.WriteFailed):
    """Writing the run's files failed (disk full, file-size limit, permissions)."""


def is_run_file(p: Path) -> bool:
    """A regular file a compare run writes (not a symlink or directory that only has its name)."""
    return (p.name in RUN_FILES or bool(_ATOMIC_TMP.fullmatch(p.name))) and p.is_file() and not p.is_symlink()


def foreign_files(d: Path) -> list[str]:
    """The entries of run directory `d` that quantbridge did not write, by name."""
    return sorted(p.name for p in d.iterdir() if not is_run_file(p))


def _names(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def remove_run(d: Path) -> list[str]:
    """Remove the files a run wrote in `d`, then `d` if that empties it; return what was left (not ours)."""
    for p in d.iterdir():
        if is_run_file(p):
            p.unlink()
    left = foreign_files(d)
    if not left:
        d.rmdir()
    return left


class RunDir:
    """OUT for one compare run. Use prepare(), then save() per row, write() for the report,
    commit() when complete; close() always (it keeps OUT.partial only if something was saved)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.given = str(out)
        self.out = Path(out).expanduser().resolve()
        self.staging = self.out.with_name(self.out.name + ".partial")
        self.lock_path = self.out.with_name(f".{self.out.name}.lock")
        self.rows: list[str] = []  # rows whose results are on disk in staging
        self.committed = False
        self.left_behind: list[str] = []  # after commit: what of the previous OUT could not go (kept in staging)
        self._lock_fd: int | None = None

    # -- before any work ------------------------------------------------------------------------
    def _lock(self) -> int:
        """Take the lock file's flock. The file is removed when the run ends (close), so a lock taken
        on a file another run removed meanwhile is dropped and taken again on the new one."""
        import fcntl

        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"cannot create --out {self.given}: {faults.describe(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"another quantbridge compare (pid {holder}) is writing to {self.given}; wait for it to "
                                f"finish or choose another --out") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the file was removed by the run that held it: lock the one there now

    def prepare(self) -> "RunDir":
        """Check OUT, create its parent, take the lock and create the staging directory."""
        refuse_unsafe(self.out, "--out")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.given} is a file, not a directory; choose a directory")
        if self.out.is_dir():
            foreign = foreign_files(self.out)
            if foreign:  # a complete run replaces OUT whole: only a run's own files may go with it
                raise UserError(f"--out {self.given} holds files that are not a quantbridge run ({_names(foreign)}); "
                                f"choose a new or empty directory, or move them away")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {self.given}: {faults.describe(e)}") from None
        fd = self._lock()
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self._check_replaceable()
            if self.staging.exists():  # an earlier interrupted run's partial results: ours to replace
                foreign = foreign_files(self.staging) if self.staging.is_dir() else [self.staging.name]
                if foreign or not (self.staging / MARKER).is_file():
                    raise UserError(f"{self.staging} is not only an earlier quantbridge partial run "
                                    f"({_names(foreign) or 'no run marker'}); move it away")
                remove_run(self.staging)
            self.staging.mkdir()
            self._mark("running")
        except OSError as e:
            self.close()
            raise UserError(f"cannot write in {self.out.parent} for --out {self.given}: {faults.describe(e)}") from None
        except BaseException:
            self.close()
            raise
        return self

    def _check_replaceable(self) -> None:
        """What the final exchange will need, tried now: room and a rename in OUT's parent (a full disk,
        `ulimit -f`, a read-only or immutable parent), and an OUT that can be moved (not a mount point,
        not immutable) with run files that can be removed."""
        faults.probe_dir(self.out.parent, PROBE_BYTES)
        if not self.out.is_dir():
            return
        for p in [self.out, *sorted(self.out.iterdir())]:
            problem = faults.replace_problem(p)
            if problem is not None:
                code = errno.errorcode[problem.errno]
                raise UserError(f"--out {self.given} cannot be replaced when the run completes: {p}: "
                                f"{problem.strerror} ({code}); {faults.os_error_hint(problem)}")

    # -- during the run -------------------------------------------------------------------------
    def save(self, comp) -> None:
        """results.json and results.csv of the rows so far, in the staging directory."""

        # results.json last: it is what an interrupted run is read back from (see `saved_rows`).
        for name, write in (("results.csv", save_csv), ("results.json", save_json)):
            path = self.staging / name
            try:
                write(comp, path)
            except OSError as e:
                raise RunWriteError(path, e) from None
        self.rows = [b.name for b in comp.backends]
        faults.stage("compare-row-saved")  # test hook: a signal once a row's results are on disk

    def write(self, name: str, data: str) -> Path:
        """Another file of the run (the report), in the staging directory; returns its final path."""

        try:
            write_atomic(self.staging / name, data)
        except OSError as e:
            raise RunWriteError(self.staging / name, e) from None
        return self.out / name

    def files(self, *names: str) -> list[Path]:
        """Where the run's files are once committed."""
        return [Path(self.given) / n for n in names]

    # -- the end --------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Put the complete run in OUT's place atomically; the previous run is then removed.

        A signal that arrives meanwhile is acted on once OUT holds the new run and nothing of
        the previous one is left (faults.deferred_signals)."""
        with faults.deferred_signals():
            try:
                self._mark("complete")
                if self.out.is_dir():
                    exchange(self.staging, self.out)  # the previous run now lies at the staging path
                    self.committed = True
                    self.left_behind = remove_run(self.staging)
                else:
                    os.rename(self.staging, self.out)
                    self.committed = True
            except OSError as e:
                if self.committed:  # removing the previous run failed: the new one is in place
                    self.left_behind = sorted(p.name for p in self.staging.iterdir()) if self.staging.is_dir() else []
                else:
                    raise RunWriteError(self.out, e) from None
        return self.out

    def close(self) -> None:
        """Remove an empty staging directory (a run that saved nothing) and release the lock."""
        try:
            if not self.committed and self.staging.is_dir():
                self.rows = self.saved_rows()
                if self.rows:
                    self._mark("partial")
                else:
                    try:
                        remove_run(self.staging)
                    except OSError:
                        pass
        finally:
            if self._lock_fd is not None:
                try:  # ours while we hold it: removed before the flock goes, so no run locks a stale file
                    if os.fstat(self._lock_fd).st_ino == os.stat(self.lock_path).st_ino:
                        os.unlink(self.lock_path)
                except OSError:
                    pass
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def kept(self, what: str) -> str:
        """One line: what stopped the run, which rows were kept where, and that OUT is intact."""
        if self.committed:  # the signal came during the final swap, which was let finish
            return f"{what} as the run completed: {self.out} holds the complete run"
        saved = self.saved_rows()
        if saved:
            rows = f"results of the finished rows ({', '.join(saved)}) are in {self.staging}/results.json"
        else:
            rows = "no row had finished"
        if self.out.is_dir() and any(self.out.iterdir()):
            prev = f"the previous complete run is intact at {self.out}"
        else:
            prev = f"{self.out} holds no previous run and was left as it was"
        return f"{what}: {rows}; {prev}"

    def saved_rows(self) -> list[str]:
        """The rows in the staging results.json: what is on disk, whatever moment a signal arrived at."""
        try:
            with open(self.staging / "results.json", encoding="utf-8") as f:
                return [b["name"] for b in json.load(f).get("backends", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []

    def _mark(self, status: str) -> None:
        try:
            data = json.dumps({"status": status, "pid": os.getpid(), "rows": self.rows}) + "\n"
            (self.staging / MARKER).write_text(data)
        except OSError:
            if status != "partial":  # best effort once things already went wrong
                raise

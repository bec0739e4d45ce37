"""Faults from outside a run: signals, full disks, file-size limits, unusable places; and the rule
that quantbridge removes only files it wrote.

Signal tests are deterministic: the command runs with QUANTBRIDGE_TEST_WAIT_AT naming a stage,
announces on stderr when it is there and waits for the signal the test then sends; nothing races a
file appearing. One subprocess test per signal (INT, TERM, HUP, a double INT), for compare, convert
and bench.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli_checks import FAST, invoke, one_line_error, previous_in, snapshot
from quantbridge.files import faults


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    """A checkpoint written by convert, to copy."""
    ck = tmp_path_factory.mktemp("ck") / "ck"
    r = invoke("convert", "tiny", "--to", "native", ck)
    assert r.exit_code == 0, r.output
    return ck


def _mount_tmpfs(path: Path, *options: str) -> None:
    """A small tmpfs at `path` (root in a container that allows it), else the test is skipped."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.fixture()
def mounts():
    made: list[Path] = []
    yield made
    for p in reversed(made):
        subprocess.run(["umount", str(p)], capture_output=True)


# -- only files quantbridge wrote are ever removed -----------------------------------------------


@pytest.mark.parametrize("entry", [".notes.tmp", "notes.txt", ".results.json.tmp", ".results.json.TOOLONG99.tmp",
                                   "results.json/", "report.md@"])
def test_compare_refuses_out_with_anything_not_its_own(tmp_path, previous, no_model_load, entry):
    """A user's file, hidden or not, a directory or a symlink under a run file's name: refused, named, kept."""
    out = previous_in(tmp_path, previous)
    name = entry.rstrip("/@")
    if entry.endswith("/"):
        (out / name).unlink()
        (out / name).mkdir()
        (out / name / "mine.txt").write_text("mine")
    elif entry.endswith("@"):
        (tmp_path / "elsewhere.md").write_text("mine")
        (out / name).symlink_to(tmp_path / "elsewhere.md")
    else:
        (out / name).write_text("mine")
    before = snapshot(tmp_path)
    one_line_error(invoke("compare", "tiny", *FAST, "--out", out), f"holds files that are not a quantbridge run ({name})")
    assert {k: v for k, v in snapshot(tmp_path).items() if ".lock" not in k} == before


def test_compare_refuses_partial_with_user_files(tmp_path, previous, no_model_load):
    out = previous_in(tmp_path, previous)
    partial = out.with_name("latest.partial")
    shutil.copytree(previous, partial)
    (partial / ".notes.tmp").write_text("mine")
    one_line_error(invoke("compare", "tiny", *FAST, "--out", out), "is not only an earlier quantbridge partial run "
                                                                     "(.notes.tmp); move it away")
    assert (partial / ".notes.tmp").read_text() == "mine" and (partial / "results.json").exists()


def test_remove_run_takes_only_run_files(tmp_path):
    """A run's files and write_atomic's leftovers go; anything else stays, and so does the directory."""
    import tempfile

    from quantbridge.run.rundir import RUN_FILES, foreign_files, remove_run

    d = tmp_path / "run"
    d.mkdir()
    for name in RUN_FILES:
        (d / name).write_text("run")
    fd, leftover = tempfile.mkstemp(dir=d, prefix=".results.json.", suffix=".tmp")  # what write_atomic names
    os.close(fd)
    mine = [".notes.tmp", "notes.txt", ".results.json.x.tmp"]
    for name in mine:
        (d / name).write_text("mine")
    assert foreign_files(d) == sorted(mine)
    assert remove_run(d) == sorted(mine)
    assert sorted(p.name for p in d.iterdir()) == sorted(mine)
    for name in mine:
        (d / name).unlink()
    for name in RUN_FILES:
        (d / name).write_text("run")
    assert remove_run(d) == [] and not d.exists()


def test_commit_keeps_a_file_added_during_the_run(tmp_path, previous):
    """A file put into OUT after the checks is not removed with the previous run: it is kept and named."""
    from quantbridge.run.rundir import RunDir

    out = previous_in(tmp_path, previous)
    run = RunDir(out).prepare()
    try:
        run.write("report.md", "# new\n")
        (out / "added-meanwhile.txt").write_text("mine")
        run.commit()
    finally:
        run.close()
    assert (out / "report.md").read_text() == "# new\n"
    assert run.left_behind == ["added-meanwhile.txt"]
    assert (run.staging / "added-meanwhile.txt").read_text() == "mine"
    assert sorted(p.name for p in run.staging.iterdir()) == ["added-meanwhile.txt"]


def test_signal_during_the_swap_is_acted_on_after_it(tmp_path, previous, monkeypatch):
    """A signal that arrives while the complete run is swapped in waits for the swap: OUT holds the new
    run, the previous one is gone, nothing is half-done, and the line says so."""
    from quantbridge.run import rundir

    out = previous_in(tmp_path, previous)
    run = rundir.RunDir(out).prepare()
    run.write("report.md", "# new\n")
    real = rundir.exchange

    def exchange_with_a_signal(new, old):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the middle of commit
        return real(new, old)

    monkeypatch.setattr(rundir, "exchange", exchange_with_a_signal)
    try:
        with pytest.raises(faults.Interrupted) as stop:
            run.commit()
    finally:
        run.close()
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143 and run.committed
    assert run.kept(stop.value.label) == f"Stopped by SIGTERM as the run completed: {out} holds the complete run"
    assert sorted(p.name for p in out.iterdir()) == [".quantbridge-run", "report.md"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["latest", "sentinel.txt"]  # the lock file goes with the run


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("mine", [["mynotes.txt", "generation_config.json"], [".hidden"], ["quantize_config.json"]])
def test_convert_refuses_checkpoint_with_user_files(tmp_path, checkpoint, no_model_load, mine, overwrite):
    """convert replaces only what it wrote; any other file refuses it, named, --overwrite or not."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    for name in mine:
        (ck / name).write_text("{}")
    before = snapshot(tmp_path)
    r = invoke("convert", "tiny", "--to", "gptq", ck, *(["--overwrite"] if overwrite else []))
    one_line_error(r, f"holds a checkpoint and files convert did not write ({', '.join(sorted(mine))}); convert "
                       "replaces only what it wrote")
    assert snapshot(tmp_path) == before


def test_checkpoint_files_without_a_manifest(tmp_path):
    """A checkpoint an older quantbridge wrote (no manifest): the names convert writes are its, others are not."""
    from quantbridge.models.checkpoint import check_out_dir
    from quantbridge.plugin.errors import UserError

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ck / name).write_text("x")
    assert check_out_dir(ck, overwrite=True)[1] == sorted(p.name for p in ck.iterdir())
    (ck / "generation_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"files convert did not write \(generation_config.json\)"):
        check_out_dir(ck, overwrite=True)


def test_convert_writes_a_manifest_and_replaces_only_it(tmp_path, checkpoint):
    from quantbridge.models.checkpoint import MANIFEST

    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert sorted(listed + [MANIFEST]) == sorted(p.name for p in checkpoint.iterdir())
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    r = invoke("convert", "tiny", "--to", "gptq", ck, "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing hidden beside it


# -- the cache is quantbridge's ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cache", "cache/new", "cache/tiny-v1"])
def test_nothing_is_written_into_the_cache(tmp_path, monkeypatch, tiny, no_model_load, where):
    from quantbridge.plugin.files import cache_dir

    cache = cache_dir()
    target = cache / where.partition("/")[2] if "/" in where else cache
    before = snapshot(cache)
    one_line_error(invoke("convert", "tiny", "--to", "native", target, "--overwrite"),
                    "quantbridge's cache directory")
    one_line_error(invoke("compare", "tiny", "--out", target / "run"), "is in quantbridge's cache directory")
    one_line_error(invoke("bench", "--quick", "--out", target / "bench"), "is in quantbridge's cache directory")
    one_line_error(invoke("plan", "results.json", "--max-ppl-increase", "1", "--out", target / "plan.json"),
                    "is in quantbridge's cache directory")
    assert snapshot(cache) == before and not (target / "run").exists()


# -- QUANTBRIDGE_CACHE that cannot be used -------------------------------------------------------


def _read_only_dir(tmp_path: Path, mounts: list) -> Path:
    d = tmp_path / "ro"
    if os.geteuid() != 0:  # permissions hold for everyone but root
        d.mkdir()
        d.chmod(0o555)
        return d
    _mount_tmpfs(d, "ro", "size=64k")
    mounts.append(d)
    return d


@pytest.mark.parametrize("case,needle", [
    ("file", "is a file, not a directory; set QUANTBRIDGE_CACHE to a directory you can write to"),
    ("below-file", "is below a file, not a directory"),
    ("read-only", "cannot be written"),
])
@pytest.mark.parametrize("command", [
    ["compare", "tiny", "--out", "{tmp}/out"],
    ["convert", "tiny", "--to", "native", "{tmp}/out"],
    ["bench", "--quick", "--out", "{tmp}/out"],
    ["plan", "tiny", "--max-ppl-increase", "1", "--compare-out", "{tmp}/out", "--out", "{tmp}/plan.json"],
])
def test_unusable_cache_dir(tmp_path, monkeypatch, mounts, no_model_load, case, needle, command):
    if case == "file":
        cache = tmp_path / "cache-file"
        cache.write_text("not a directory")
    elif case == "below-file":
        (tmp_path / "f").write_text("a file")
        cache = tmp_path / "f" / "cache"
    else:
        ro = _read_only_dir(tmp_path, mounts)
        cache = ro if os.geteuid() == 0 else ro / "cache"  # root: a read-only mount; others: no permission
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(cache))
    line = one_line_error(invoke(*[a.format(tmp=tmp_path) for a in command]), needle)
    assert f"QUANTBRIDGE_CACHE={cache}" in line
    if case == "read-only":
        assert "(EROFS)" in line or "(EACCES)" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "plan.json").exists()


# -- every output path is tried before any work ---------------------------------------------------


@pytest.mark.parametrize("command,needle", [
    (["plan", "tiny", "--max-ppl-increase", "1", "--out", "/proc/nonexistent/plan.json"],
     "cannot create the directory of --out /proc/nonexistent/plan.json: No such file or directory (ENOENT)"),
    (["bench", "--quick", "--backends", "fp16", "--out", "/proc/nonexistent/bench"],
     "cannot create --out /proc/nonexistent/bench: No such file or directory (ENOENT)"),
    (["serve-stats", "{prof}", "--out", "/proc/nonexistent/merged.json"],
     "cannot create the directory of --out /proc/nonexistent/merged.json"),
    (["serve-stats", "{prof}", "--out", "/proc/self/merged.json"], "cannot write --out /proc/self/merged.json"),
])
def test_unwritable_out_is_refused_before_work(tmp_path, monkeypatch, no_model_load, command, needle):
    import quantbridge.run.bench as bench
    import quantbridge.vllm.stats as servestats

    def refuse(*a, **k):
        raise AssertionError("the work began before the output path was checked")

    monkeypatch.setattr(bench, "run_bench", refuse)
    monkeypatch.setattr(servestats, "load_workers", refuse)
    (tmp_path / "prof").mkdir()
    one_line_error(invoke(*[a.format(prof=tmp_path / "prof") for a in command]), needle)


@pytest.mark.parametrize("mine", ["bench.md", "roofline.png", "bench.json"])
def test_bench_replaces_only_its_own_files(tmp_path, monkeypatch, mine):
    import quantbridge.run.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("the work began"))
    out = tmp_path / "bench"
    out.mkdir()
    (out / mine).write_text("mine")
    one_line_error(invoke("bench", "--quick", "--out", out), f"holds {mine}, which quantbridge bench did not write")
    assert (out / mine).read_text() == "mine"


def test_immutable_out_is_refused_before_work(tmp_path, previous, checkpoint, no_model_load):
    out = previous_in(tmp_path, previous)
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    for d in (out, ck):
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not permitted here")
    try:
        line = one_line_error(invoke("compare", "tiny", *FAST, "--out", out), "cannot be replaced when the run completes")
        assert "immutable (chattr +i) (EPERM)" in line and "chattr -i" in line and "disk space" not in line
        line = one_line_error(invoke("convert", "tiny", "--to", "gptq", ck, "--overwrite"), f"{ck}: it is immutable")
        assert "(EPERM)" in line and "disk space" not in line
    finally:
        for d in (out, ck):
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def test_mount_point_out_is_refused_before_work(tmp_path, mounts, previous, no_model_load):
    out = tmp_path / "runs" / "latest"
    _mount_tmpfs(out, "size=1m")
    mounts.append(out)
    line = one_line_error(invoke("compare", "tiny", *FAST, "--out", out), f"{out}: it is a mount point (EBUSY)")
    assert "choose a directory inside it" in line and "disk space" not in line
    line = one_line_error(invoke("convert", "tiny", "--to", "native", out), "it is a mount point (EBUSY)")
    assert not any(out.iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                  errno.EBUSY, errno.EXDEV, errno.ENOTDIR, errno.ENOENT, errno.EIO])
def test_every_errno_gets_its_own_hint(code):
    hint = faults.os_error_hint(OSError(code, os.strerror(code)))
    others = {c: faults.os_error_hint(c) for c in (errno.ENOSPC, errno.EFBIG, errno.EPERM, errno.EBUSY) if c != code}
    assert hint and hint not in others.values()
    if code not in (errno.ENOSPC, errno.EDQUOT):
        assert "free space" not in hint and "disk space" not in hint
    assert f"({errno.errorcode[code]})" in faults.describe(OSError(code, os.strerror(code)))


def test_efbig_hint_names_the_limit():
    code = ("import resource; from quantbridge.files import faults; resource.setrlimit(resource.RLIMIT_FSIZE, (20480, "
            "resource.getrlimit(resource.RLIMIT_FSIZE)[1])); print(faults.os_error_hint(27))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "the file-size limit (20 KiB) was reached: raise it (ulimit -f unlimited) or write less"


# -- TMPDIR full, ulimit -f ----------------------------------------------------------------------


def _limit_fsize(nbytes: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


def _cli(*args, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantbridge.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=timeout)


def _single_error(r: subprocess.CompletedProcess, needle: str, code: int = 2) -> str:
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], r.stderr
    return lines[0]


def test_ulimit_f_is_one_line_before_work(tmp_path, tiny, previous):
    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    r = _cli("compare", "tiny", *FAST, "-q", "--out", out, preexec_fn=_limit_fsize(20 * 1024),
             env={"TMPDIR": str(tmp_path)})
    line = _single_error(r, "File too large (EFBIG); the file-size limit (20 KiB) was reached: raise it "
                            "(ulimit -f unlimited)")
    assert "QUANTBRIDGE_CACHE=" in line and snapshot(out) == before  # the first place tried: the cache
    assert _ours_in(tmp_path) == []  # no temporary file left


def test_full_tmpdir_is_one_line_before_work(tmp_path, mounts, tiny, previous):
    out = previous_in(tmp_path, previous)
    full = tmp_path / "full"
    _mount_tmpfs(full, "size=64k")
    mounts.append(full)
    r = _cli("compare", "tiny", *FAST, "-q", "--out", out, env={"TMPDIR": str(full)})
    _single_error(r, f"TMPDIR={full} cannot hold quantbridge's temporary files: No space left on device (ENOSPC); "
                     "the file system is full")
    assert not any(full.iterdir())


def test_a_write_that_fails_later_is_caught_where_it_happens(tmp_path, monkeypatch, previous):
    """TMPDIR fills up after the check, when the reference activations are written: one line, errno and hint."""
    import quantbridge.run.launcher as iso

    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    real = iso.save

    def fill_up(obj, path):
        if Path(path).name == "reference.pt":
            with open(path, "wb") as f:
                f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path)

    monkeypatch.setattr(iso, "save", fill_up)
    line = one_line_error(invoke("compare", "tiny", "--backends", "fp16", *FAST, "--out", out),
                           "could not write the reference activations (in TMPDIR=")
    assert "No space left on device (ENOSPC); the file system is full" in line
    assert f"no row had finished; the previous complete run is intact at {out}" in line
    assert snapshot(out) == before and _ours_in(tmp_path) == []


@pytest.mark.parametrize("fault", ["full", "fills-up", "ulimit"])
def test_convert_on_a_full_or_limited_file_system(tmp_path, mounts, tiny, fault):
    """Too little room or `ulimit -f`: refused before work when the probe shows it, else one line where the
    checkpoint is written; either way nothing is left beside OUT_DIR."""
    disk = tmp_path / "disk"
    if fault == "ulimit":
        disk.mkdir()
        r = _cli("convert", "tiny", "--to", "native", disk / "ck", preexec_fn=_limit_fsize(2 << 20))
        _single_error(r, "could not write the new checkpoint beside OUT_DIR")
        assert "File too large (EFBIG); the file-size limit (2 MiB) was reached" in r.stderr
    else:
        _mount_tmpfs(disk, "size=64k" if fault == "full" else "size=2m")
        mounts.append(disk)
        r = invoke("convert", "tiny", "--to", "native", disk / "ck")
        needle = (f"OUT_DIR {disk / 'ck'} cannot be written: {disk}: No space left on device (ENOSPC)"
                  if fault == "full" else "could not write the new checkpoint beside OUT_DIR")
        line = one_line_error(r, needle)
        assert "(ENOSPC); the file system is full" in line
    assert not any(disk.iterdir())


def test_full_cache_is_one_line(tmp_path, mounts, monkeypatch):
    """Building the tiny model into a cache that fills up: one line naming the cache and ENOSPC."""
    cache = tmp_path / "cache"
    _mount_tmpfs(cache, "size=2m")
    mounts.append(cache)
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(cache))
    line = one_line_error(invoke("compare", "tiny", "--backends", "fp16", *FAST, "--out", tmp_path / "out"),
                           "in quantbridge's cache: No space left on device (ENOSPC)")
    assert f"cannot write {cache}/tiny-v" in line
    assert not any(cache.iterdir()) and not (tmp_path / "out").exists()


def test_isolation_save_raises_the_errno(tmp_path):
    """torch.save to a path hides ENOSPC/EFBIG in a RuntimeError; our save shows the OSError."""
    code = ("import resource, torch; from quantbridge.run.launcher import save; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n    save(torch.randn(100000), %r)\nexcept OSError as e:\n    print(e.errno)" % str(tmp_path / "t.pt"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == str(errno.EFBIG), r.stderr


# -- signals: one subprocess test per signal -------------------------------------------------------


class _Run:
    """A quantbridge command in its own session, stopped at named stages (QUANTBRIDGE_TEST_WAIT_AT)."""

    def __init__(self, args, wait_at: str, env: dict | None = None) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "quantbridge.cli", *map(str, args)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                  env={**os.environ, faults.WAIT_ENV: wait_at, **(env or {})})
        self.watchdog = threading.Timer(600, self.p.kill)  # a hung command fails the test instead of hanging it
        self.watchdog.start()
        self.before: list[str] = []

    def at(self, stage: str) -> None:
        """Block until the command says it waits at `stage` (it waits for our signal there)."""
        while True:
            line = self.p.stderr.readline()
            if not line:
                out, err = self.p.communicate()
                pytest.fail(f"exited {self.p.returncode} before {stage}:\n{''.join(self.before)}{err}{out}")
            if line.rstrip("\n").endswith(f"{faults.ANNOUNCE}{stage}"):  # one write(2): never split
                return
            self.before.append(line)

    def signal(self, sig: int, group: bool = False) -> None:
        (os.killpg if group else os.kill)(self.p.pid, sig)  # group: as a terminal's Ctrl-C reaches every process

    def release(self) -> None:
        """Let a stage that waits for input (signals are ignored there) go on."""
        self.p.stdin.write("\n")
        self.p.stdin.flush()

    def finish(self, ignore: tuple[str, ...] = ()) -> tuple[int, str]:
        """The exit status and the one line the command ended with (lines starting with `ignore` aside)."""
        try:
            out, err = self.p.communicate(timeout=300)
        finally:
            self.watchdog.cancel()
            if self.p.poll() is None:
                self.p.kill()
        err = "".join(self.before) + err  # what came before the stages too
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip() and faults.ANNOUNCE not in line
                 and not line.startswith(ignore)]
        assert len(lines) == 1, err  # one line says what finished and where
        return self.p.returncode, lines[0]


def _compare(out: Path, tmpdir: Path, wait_at: str) -> _Run:
    tmpdir.mkdir(exist_ok=True)
    return _Run(["compare", "tiny", "--backends", "fp16,native", *FAST, "-q", "--out", out], wait_at,
                {"TMPDIR": str(tmpdir)})


def _ours_in(tmpdir: Path) -> list[str]:
    """quantbridge's temporary files and directories in TMPDIR (torch keeps caches of its own there)."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith(("quantbridge", faults.PROBE_PREFIX)))


def _assert_partial(out: Path, before: dict, rows: list[str]) -> None:
    partial = out.with_name("latest.partial")
    assert snapshot(out) == before and (out.parent / "sentinel.txt").read_text() == "keep me"
    if rows:
        assert [b["name"] for b in json.loads((partial / "results.json").read_text())["backends"]] == rows
        assert json.loads((partial / ".quantbridge-run").read_text())["status"] == "partial"  # not "running"
    else:
        assert not partial.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["latest", "sentinel.txt", *(["latest.partial"] if rows else [])])


@pytest.mark.parametrize("sig,label,stage", [
    (signal.SIGINT, "Aborted", "compare-row-saved"),
    (signal.SIGINT, "Aborted", "child-started"),  # the row's process is starting up: it prints nothing
    (signal.SIGHUP, "Stopped by SIGHUP", "compare-row-saved"),
    (signal.SIGTERM, "Stopped by SIGTERM", "compare-row-started"),  # a row's process is running
])
def test_compare_signal(tmp_path, previous, sig, label, stage):
    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    run = _compare(out, tmp_path / "tmp", stage)
    run.at(stage)
    run.signal(sig, group=sig == signal.SIGINT)
    code, line = run.finish()
    assert code == 128 + sig
    partial = out.with_name("latest.partial")
    if stage == "compare-row-saved":  # the first row is on disk
        assert line == (f"{label}: results of the finished rows (fp16) are in {partial}/results.json; "
                        f"the previous complete run is intact at {out}")
        _assert_partial(out, before, ["fp16"])
    else:
        assert line == f"{label}: no row had finished; the previous complete run is intact at {out}"
        _assert_partial(out, before, [])
    assert _ours_in(tmp_path / "tmp") == []  # the reference activations and the row's files are gone


def test_compare_double_ctrl_c(tmp_path, previous):
    """A second Ctrl-C while the first one's cleanup runs, and a third while the process exits: the
    cleanup finishes and the exit status stays 130 (not -2, the signal's own)."""
    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    run = _compare(out, tmp_path / "tmp", "compare-row-saved,temp-cleanup,exit")
    run.at("compare-row-saved")
    run.signal(signal.SIGINT, group=True)
    run.at("temp-cleanup")
    run.signal(signal.SIGINT, group=True)
    run.at("exit")
    run.signal(signal.SIGINT, group=True)  # ignored from here on: kill() returns once it was discarded
    run.release()
    code, line = run.finish()
    assert code == 130
    assert line.startswith("Aborted: results of the finished rows (fp16) are in ")
    _assert_partial(out, before, ["fp16"])
    assert _ours_in(tmp_path / "tmp") == []


@pytest.mark.parametrize("sig,stage", [(signal.SIGINT, "convert-swap"), (signal.SIGTERM, "convert-written")])
def test_convert_signal(tmp_path, checkpoint, sig, stage):
    """During the swap the swap finishes (the new checkpoint, nothing hidden); before it OUT_DIR stays as it was."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    before = snapshot(ck)
    run = _Run(["convert", "tiny", "--to", "gptq", ck, "--overwrite"], stage)
    run.at(stage)
    run.signal(sig, group=sig == signal.SIGINT)
    code, line = run.finish(ignore=("--overwrite: the checkpoint in",))
    assert code == 128 + sig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no hidden .ck.tmp / .ck.old left
    method = json.loads((ck / "config.json").read_text())["quantization_config"]["quant_method"]
    if stage == "convert-swap":
        assert line == f"Aborted: {ck} holds the new checkpoint, complete; nothing else was left behind"
        assert method == "gptq"
    else:
        assert line == f"Stopped by SIGTERM: the previous checkpoint in {ck} is intact; nothing else was left behind"
        assert snapshot(ck) == before


def test_bench_signal(tmp_path):
    out = tmp_path / "bench"
    run = _Run(["bench", "--quick", "--backends", "fp16", "--isolation", "none", "--runs", "5", "--out", out],
               "bench-saved")
    run.at("bench-saved")
    run.signal(signal.SIGTERM)
    code, line = run.finish(ignore=("  ",))  # bench's progress lines
    assert code == 143
    saved = json.loads((out / "bench.json").read_text())
    rows = saved["rows"]
    assert saved["complete"] is False  # a cut-off run's file says it holds part of what was asked
    assert rows and line == f"Stopped by SIGTERM: {out / 'bench.json'} holds the {len(rows)} rows measured so far"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]

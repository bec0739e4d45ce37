"""Rows in child processes: a row whose process dies is one failed row; the others finish, unchanged."""

import copy
import json
import os
import signal

import isolation_backends as crash
import pytest
import torch
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.spec import QuantSpec
from quantbridge.results.schema import BackendResult, Comparison, load_json, save_json
from quantbridge.run import compare
from quantbridge.run.bench import run_bench
from quantbridge.run.compare import Settings, run_comparison
from quantbridge.run.launcher import Launcher, Outcome, run_isolated

CPU = torch.device("cpu")
# One quantized layer, one M, few runs: each row's process costs a few seconds to start anyway.
ONE_LAYER = r"^(?!model\.layers\.0\.self_attn\.q_proj$)"
FAST = dict(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=32, skip=ONE_LAYER)


@pytest.fixture
def crashing_backends():
    crash.register_all()
    yield
    crash.unregister_all()


def _run(tiny, names, isolation="process", **kw):
    return run_comparison(tiny, names, Settings(**{**FAST, **kw}), CPU, torch.float32, isolation=isolation)


# --- isolation.run_isolated on its own -------------------------------------------------------

def test_child_returns_its_value_and_messages():
    seen = []
    out = run_isolated("isolation_backends:returns", 2.0)
    assert out.ok and out.reason is None and out.exitcode == 0
    assert out.value["x"] == 2.0 and torch.equal(out.value["t"], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    out = run_isolated("isolation_backends:talks", 3, on_message=seen.append)
    assert out.value == "done" and seen == [("step", 0), ("step", 1), ("step", 2)]


@pytest.mark.parametrize("fn, signal_name, exitcode, reason", [
    ("sigkill", "SIGKILL", -signal.SIGKILL, "killed by SIGKILL"),
    ("sigsegv", "SIGSEGV", -signal.SIGSEGV, "killed by SIGSEGV"),
    ("exit3", None, 3, "exited with code 3 before returning a result"),
])
def test_dead_child_is_described(fn, signal_name, exitcode, reason):
    out = run_isolated(f"isolation_backends:{fn}", 0)
    assert not out.ok and out.value is None
    assert (out.signal, out.exitcode, out.reason) == (signal_name, exitcode, reason)


def test_a_result_handed_over_before_an_unclean_exit_is_kept():
    out = run_isolated("isolation_backends:returns_then_dies", 21)
    assert out.ok and out.value == 42 and out.exitcode == 7


def test_child_exception_and_timeout():
    out = run_isolated("isolation_backends:raises", "key")
    assert (out.exception, out.message, out.reason) == ("KeyError", "'missing key'", "KeyError: 'missing key'")
    assert "raises" in out.traceback
    out = run_isolated("isolation_backends:sleeps", 60, timeout=2)
    assert out.timed_out == 2 and out.reason.startswith("timed out after 2 s") and out.seconds < 30


def test_unimportable_target_is_an_exception_not_a_hang():
    out = run_isolated("no_such_module_here:fn")
    assert out.exception == "ModuleNotFoundError"


# --- the launcher: one unit of work here or in a child, one failure wording ----------------------

def test_launcher_runs_a_unit_here_or_in_a_child_and_its_messages_flow_either_way():
    for launcher in (Launcher.asked("none"), Launcher.asked("process")):
        seen = []
        out = launcher.run("isolation_backends:talks", 2, on_message=seen.append)
        assert out.ok and out.value == "done" and seen == [("step", 0), ("step", 1)], launcher
    assert Launcher.asked("process").how == "process" and Launcher.asked("none").how == "none"
    here = Launcher.asked("process", here_because="--debug")
    assert not here.isolated and here.how == "none (--debug)"
    assert here.run("no_such_module_here:fn", None, here=lambda: 7).value == 7  # `here` instead of the target
    with pytest.raises(KeyError, match="missing key"):  # in this process an exception is the caller's
        here.run("isolation_backends:raises", "key")
    with pytest.raises(UserError, match="--isolation 'thread' is not one of process, none"):
        Launcher.asked("thread")


def test_a_unit_that_did_not_return_has_one_reason():
    raised = Outcome(exitcode=1, exception="KeyError", message="'missing key'")
    assert raised.failure() == "KeyError: 'missing key' (in the row's process)"
    assert raised.failure(outside="the row's own error handling") == \
        "KeyError: 'missing key' (in the row's process, outside the row's own error handling)"
    assert Outcome(exitcode=-9, signal="SIGKILL").failure() == "the row's process killed by SIGKILL"
    assert Outcome(exitcode=3).failure() == "the row's process exited with code 3 before returning a result"
    assert Outcome(value=1, returned=True).failure() is None


# --- compare -------------------------------------------------------------------------------

def test_killed_row_fails_alone(tiny, crashing_backends, tmp_path):
    comp = _run(tiny, ["test-sigkill", "test-raise", "test-exit3", "native"])
    status = {b.name: (b.status, b.reason) for b in comp.backends}
    assert status["fp16"][0] == "ok" and status["native"][0] == "ok"
    assert status["test-sigkill"] == ("failed", "the row's process killed by SIGKILL")
    assert status["test-exit3"] == ("failed", "the row's process exited with code 3 before returning a result")
    assert status["test-raise"][0] == "failed"
    assert status["test-raise"][1].startswith("ValueError: kernel refused this layer (at ")  # first line only
    assert comp.settings["isolation"] == "process"
    save_json(comp, tmp_path / "results.json")
    again = load_json(tmp_path / "results.json")
    assert again.to_dict() == comp.to_dict()
    assert [b.name for b in again.backends] == ["fp16", "test-sigkill", "test-raise", "test-exit3", "native"]
    native = comp.backend("native")
    assert native.model_metrics["isolation"]["process"] == "own"
    assert "the row's own process" in native.model_metrics["telemetry"]["memory_kind"]


def test_isolated_rows_equal_in_process_rows(tiny):
    a = _run(tiny, ["native"], isolation="none")
    b = _run(tiny, ["native"], isolation="process")
    assert a.settings["isolation"] == "none" and b.settings["isolation"] == "process"
    for x, y in zip(a.backends, b.backends, strict=True):
        assert (x.name, x.status, x.kernel, x.weights) == (y.name, y.status, y.kernel, y.weights)
        assert [r.error for r in x.layers] == [r.error for r in y.layers]  # bit-identical on the CPU
        for key in ("eval_loss", "logits_rel_error"):
            assert x.model_metrics[key] == y.model_metrics[key]


def test_model_changed_in_memory_is_refused_in_the_child(tiny):
    changed = copy.copy(tiny)
    changed.model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        changed.model.model.embed_tokens.weight[0, 0] += 1.0
    comp = _run(changed, ["fp16"])
    assert comp.backends[0].status == "failed" and "changed in memory" in comp.backends[0].reason


def test_in_memory_model_and_debug_run_in_process(tiny, crashing_backends):
    built = copy.copy(tiny)
    built.origin = None
    comp = _run(built, ["test-raise"])
    assert comp.settings["isolation"].startswith("none (the model was built in memory")
    assert comp.backend("test-raise").status == "failed"
    with pytest.raises(ValueError, match="kernel refused"):  # --debug re-raises: only possible in-process
        _run(tiny, ["test-raise"], debug=True)


def test_rows_after_a_calibration_read_its_cache(tiny, monkeypatch):
    """--no-cache: the first row needing gptq's weights calibrates; later rows read what it cached."""
    jobs = []

    def fake(target, job, **kw):
        jobs.append(job)
        return Outcome(value=BackendResult(name=job.name, status="ok"), exitcode=0, returned=True)

    monkeypatch.setattr(compare.iso, "run_isolated", fake)
    _run(tiny, ["gptq", "native"], weights="gptq", cache=False)
    assert [(j.name, j.use_cache) for j in jobs] == [("fp16", False), ("gptq", False), ("native", True)]
    jobs.clear()
    _run(tiny, ["gptq", "awq", "native"], cache=False)
    assert [(j.name, j.use_cache) for j in jobs] == [("fp16", False), ("gptq", False), ("awq", False),
                                                      ("native", False)]


# --- bench and the CLI ---------------------------------------------------------------------

def test_bench_killed_backend_keeps_the_others(crashing_backends):
    res = run_bench([(256, 128), (128, 256)], [1, 2], ["native", "test-sigkill"], CPU, torch.float32,
                    QuantSpec(group_size=64), runs=5, warmup=1, isolation="process")
    by = {}
    for r in res["rows"]:
        by.setdefault(r["backend"], []).append(r)
    assert all(r["status"] == "ok" for b in ("fp16", "native") for r in by[b])
    assert len(by["test-sigkill"]) == 4
    assert all(r["status"] == "failed" and r["reason"] == "the row's process killed by SIGKILL"
               for r in by["test-sigkill"])
    assert [(r["k"], r["backend"]) for r in res["rows"]][:6] == [(256, "fp16")] * 2 + [(256, "native")] * 2 + \
        [(256, "test-sigkill")] * 2  # shape-major, as in-process
    json.dumps(res)


def test_cli_compare_isolated_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["compare", "tiny", "--backends", "fp16,native", "--batch", "1", "--prefill", "0",
                                 "--runs", "5", "--warmup", "1", "--eval-len", "32", "--eval-seqs", "1",
                                 "--skip", ONE_LAYER, "--isolation", "process", "--no-report", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    comp = Comparison.from_dict(json.loads((out / "results.json").read_text()))
    assert comp.settings["isolation"] == "process"
    assert [(b.name, b.status) for b in comp.backends] == [("fp16", "ok"), ("native", "ok")]


def test_a_killed_runs_temporary_directory_is_removed_by_the_next(tmp_path, monkeypatch):
    """A run killed with SIGKILL cannot remove its private directory; the next run that makes one
    removes it: only ours (prefix, process id, 0700) and only when that process is gone."""
    import subprocess
    import tempfile

    from quantbridge.run import launcher

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = f"quantbridge-compare-{gone.pid}-", f"quantbridge-compare-{os.getpid()}-"
    made = {name: tmp_path / name for name in (dead + "a1", alive + "b2", dead + "c3", "quantbridge-compare-x-d4")}
    for name, d in made.items():
        d.mkdir(mode=0o700)
        (d / "reference.pt").write_bytes(os.urandom(64))
    made[dead + "c3"].chmod(0o755)  # not a directory quantbridge made (mkdtemp makes 0700)
    with launcher.private_dir("quantbridge-compare-") as mine:
        assert mine.name.startswith(alive)
        assert not made[dead + "a1"].exists()
        assert all(made[n].exists() for n in (alive + "b2", dead + "c3", "quantbridge-compare-x-d4"))
    assert not mine.exists()

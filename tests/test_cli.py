"""The command line: bad input gives one line and exit code 2; compare writes its files."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantbridge.cli import cli

FAST = ["--batch", "1,4", "--prefill", "16", "--runs", "5", "--warmup", "1", "--eval-len", "32", "--eval-seqs", "1"]


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("args,needle", [
    (["compare", "./no/such/model"], "does not exist"),
    (["compare", "tiny", "--backends", "fp16,nope"], "unknown backend 'nope'; valid backends: fp16, native"),
    (["compare", "tiny", "--group-size", "48"], "group size 48 is not supported"),
    (["compare", "tiny", "--batch", "1,x"], "comma-separated list of integers"),
    (["compare", "tiny", "--runs", "2"], "at least 5"),
    (["compare", "tiny", "--dtype", "int3"], "unknown --dtype"),
])
def test_bad_input_one_line_exit_2(args, needle):
    r = _invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1


def test_missing_path_via_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantbridge.cli", "compare", str(tmp_path / "absent")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    # Off a terminal a stage line ("[0:00] loading …") may come first; the error is one line of its own.
    errors = [line for line in r.stderr.splitlines() if not line.startswith("[")]
    assert len(errors) == 1 and errors[0].startswith("Error: model path") and "Traceback" not in r.stderr


def test_compare_demo_writes_results(tmp_path, tiny):
    out = tmp_path / "run"
    r = _invoke("compare", "tiny", "--backends", "fp16,native", *FAST, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "reference-torch" in r.output and "Σ linear-layer latency" in r.output
    data = json.loads((out / "results.json").read_text())
    assert [b["name"] for b in data["backends"]] == ["fp16", "native"]
    assert all(len(b["layers"]) == 29 for b in data["backends"])
    assert (out / "results.csv").read_text().count("\n") == 1 + 2 * 29 * 3


def test_env_lists_backends():
    r = _invoke("env", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    names = {b["backend"]: b for b in data["backends"]}
    assert names["native"]["available"] and names["fp16"]["available"]
    assert data["device"]["libraries"]["torch"]


@pytest.mark.parametrize("cmd", [[], ["compare"], ["env"]])
def test_help_teaches_with_example(cmd):
    r = _invoke(*cmd, "--help")
    assert r.exit_code == 0
    assert "quantbridge" in r.output and ("Example" in r.output or "Start with" in r.output)

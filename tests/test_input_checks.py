"""Bad values, refused in one line (exit 2) before the work they would spoil, in every command that takes them.

Each test covers a class: every option of that kind, in every command that has one.
"""

import json
import random

import pytest
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.errors import UserError

FAST = ["--runs", "5", "--warmup", "0", "--batch", "1", "--prefill", "0", "--eval-len", "16", "--eval-seqs", "1"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(r, needle: str, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    assert needle in errors[0], r.output


@pytest.fixture()
def no_work(monkeypatch):
    """Nothing may be loaded, benchmarked or measured: these checks come first."""
    import quantbridge.bench
    import quantbridge.cli
    import quantbridge.compare
    import quantbridge.convert
    import quantbridge.models

    def refuse(*a, **k):
        raise AssertionError("work started before the bad input was refused")

    for module, name in ((quantbridge.models, "load_model"), (quantbridge.convert, "load_model"),
                         (quantbridge.bench, "run_bench"), (quantbridge.cli, "run_compare")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture()
def no_measuring(monkeypatch):
    """The model may load (the check needs its layers), but the reference run must not start."""
    import quantbridge.compare

    def refuse(*a, **k):
        raise AssertionError("the measuring started before the bad input was refused")

    monkeypatch.setattr(quantbridge.compare, "run_reference", refuse)


def _invalid_group_size(rng: random.Random) -> int:
    while True:
        g = rng.randint(-1000, 1000)
        if g not in (32, 64, 128, -1):
            return g


# -- group size: every command that takes one ---------------------------------------------------------


def test_parse_group_size_takes_only_supported_sizes():
    from quantbridge.spec import AUTO_GROUP, SUPPORTED_GROUP_SIZES, parse_group_size

    assert parse_group_size("auto") == parse_group_size(" AUTO ") == AUTO_GROUP
    for g in SUPPORTED_GROUP_SIZES:
        assert parse_group_size(str(g)) == g
    for g in [0, -0, 1, 2, 16, 48, 96, 256, 512, -2, -32, -128, *range(-300, 300)]:
        if g in SUPPORTED_GROUP_SIZES:
            continue
        with pytest.raises(UserError, match=rf"group size {g} is not supported .*use auto, 32, 64, 128 or -1"):
            parse_group_size(str(g))
    for text in ["", "x", "64.0", "1e2", "auto64"]:
        with pytest.raises(UserError, match="is not a group size; use auto, 32, 64, 128 or -1"):
            parse_group_size(text)


@pytest.mark.parametrize("command", [
    ["compare", "tiny", "--out", "{tmp}/out"],
    ["convert", "tiny", "--to", "native", "{tmp}/out"],
    ["bench", "--quick", "--out", "{tmp}/out"],
    ["bench", "--shapes", "4096x4096", "--out", "{tmp}/out"],
])
def test_group_size_refused_in_every_command(tmp_path, no_work, command):
    rng = random.Random()
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    for g in ["0", "-2", "96", str(_invalid_group_size(rng)), "x"]:
        needle = "is not a group size" if g == "x" else f"group size {int(g)} is not supported"
        _one_line_error(_invoke(*args, "--group-size", g), needle)
    assert not (tmp_path / "out").exists()


# -- integers that must be positive: batch lists, shapes, M -------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["compare", "tiny", "--batch", "0"], "0 is not a positive integer"),
    (["compare", "tiny", "--batch", "1,16,-4"], "-4 is not a positive integer"),
    (["bench", "--batch", "0"], "0 is not a positive integer"),
    (["bench", "--batch", "1,-1"], "-1 is not a positive integer"),
    (["bench", "--shapes", "0x0"], "shape 0x0 has a dimension below 1"),
    (["bench", "--shapes", "4096x0"], "shape 4096x0 has a dimension below 1"),
    (["bench", "--shapes", "quick,-64x64"], "shape -64x64 has a dimension below 1"),
    (["bench", "--shapes", ","], "names no shape"),
    (["plan", "tiny", "--batch", "0", "--max-weight-gb", "1"], "--batch"),
    (["plan", "tiny", "--batch", "-16", "--max-weight-gb", "1"], "--batch"),
    (["compare", "tiny", "--runs", "0"], "at least 5"),
    (["compare", "tiny", "--eval-seqs", "0"], "--eval-seqs"),
    (["compare", "tiny", "--calib-samples", "0"], "--calib-samples"),
    (["convert", "tiny", "--to", "native", "OUT", "--calib-samples", "0"], "--calib-samples"),
    (["convert", "tiny", "--to", "native", "OUT", "--calib-len", "-1"], "--calib-len"),
    (["bench", "--runs", "0"], "--runs"),
    (["bench", "--warmup", "-1"], "--warmup"),
])
def test_non_positive_integers_refused(tmp_path, no_work, args, needle):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    if args[0] in ("compare", "bench"):
        args += ["--out", str(tmp_path / "out")]
    _one_line_error(_invoke(*args), needle)
    assert not (tmp_path / "out").exists()


def test_plan_batch_zero_on_results_file(tmp_path, no_work):
    results = tmp_path / "results.json"
    results.write_text("{}")
    _one_line_error(_invoke("plan", results, "--batch", "0", "--max-weight-gb", "1", "--out", tmp_path / "p.json"),
                    "--batch")
    assert not (tmp_path / "p.json").exists()


def test_run_bench_refuses_non_positive_sizes():
    import torch

    from quantbridge.bench import run_bench
    from quantbridge.spec import QuantSpec

    for shapes, ms, needle in [([(64, 64)], [0], "M=0 is not a positive batch size"),
                               ([(64, 64)], [1, -3], "M=-3"), ([(0, 64)], [1], "shape 0x64"),
                               ([(64, -1)], [1], "shape 64x-1")]:
        with pytest.raises(UserError, match=needle):
            run_bench(shapes, ms, ["fp16"], torch.device("cpu"), torch.float32, QuantSpec(), runs=5, warmup=1)


# -- --plan that does not fit the model ---------------------------------------------------------------


def _plan_file(tmp_path, layers: dict, backends=None):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"schema": 1, "layers": layers,
                             "backends": sorted(set(layers.values()) - {"fp16"}) if backends is None else backends}))
    return p


def test_plan_naming_layers_the_model_lacks(tmp_path, tiny, no_measuring):
    layers = {"model.layers.0.mlp.down_proj": "native", "model.layers.9.mlp.down_proj": "native",
              "model.layers.0.self_attn.q_prj": "fp16"}
    plan = _plan_file(tmp_path, layers)
    r = _invoke("compare", "tiny", "--plan", plan, *FAST, "--out", tmp_path / "out")
    _one_line_error(r, "--plan names 2 layer(s) model tiny lacks: model.layers.9.mlp.down_proj, "
                       "model.layers.0.self_attn.q_prj (did you mean model.layers.0.self_attn.q_proj?); "
                       "was the plan made for another model?")
    assert not (tmp_path / "out").exists()


def test_plan_quantizing_a_skipped_layer(tmp_path, tiny, no_measuring):
    plan = _plan_file(tmp_path, {"model.layers.1.mlp.up_proj": "native", "lm_head": "native"})
    r = _invoke("compare", "tiny", "--plan", plan, *FAST, "--out", tmp_path / "out")
    _one_line_error(r, "--plan assigns native to lm_head, which this run keeps unquantized")


@pytest.mark.parametrize("layers,backends,needle", [
    ({"model.layers.0.mlp.up_proj": "no-such-backend"}, None, "unknown backend 'no-such-backend'"),
    ({"model.layers.0.mlp.up_proj": 4}, None, "is assigned 4, not a backend name"),
    ({"model.layers.0.mlp.up_proj": "native"}, "native", "'backends' is not a list"),
])
def test_plan_file_with_bad_assignments(tmp_path, no_work, layers, backends, needle):
    plan = _plan_file(tmp_path, layers, [] if backends is None else backends)
    _one_line_error(_invoke("compare", "tiny", "--plan", plan, "--out", tmp_path / "out"), needle)


def test_plan_backends_come_from_its_layers(tmp_path):
    from quantbridge.plan import load_plan

    plan = load_plan(str(_plan_file(tmp_path, {"a": "native", "b": "fp16"}, backends=[])))
    assert plan["backends"] == ["native"]  # a hand-edited plan runs every backend it assigns


# -- --skip that leaves nothing to quantize -----------------------------------------------------------


def test_skip_targets():
    from quantbridge.preflight import skip_targets

    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("mlp.up_proj", "self_attn.o_proj")] + ["lm_head"]
    assert skip_targets(names, r"(^|\.)lm_head$", "m") == names[:-1]
    assert skip_targets(names, "mlp", "m") == [n for n in names if "mlp" not in n]
    for pattern in [".*", "", "^", "proj|head", r"\.|head", "[a-z]"]:
        with pytest.raises(UserError, match=rf"matches every linear layer of m \({len(names)}\): nothing left to quantize"):
            skip_targets(names, pattern, "m")


@pytest.mark.parametrize("pattern", [".*", "proj|lm_head"])
def test_skip_everything_refused_before_work(tmp_path, tiny, no_measuring, pattern):
    _one_line_error(_invoke("compare", "tiny", "--skip", pattern, *FAST, "--out", tmp_path / "out"),
                    f"--skip {pattern!r} matches every linear layer of tiny (29): nothing left to quantize")
    assert not (tmp_path / "out").exists()
    _one_line_error(_invoke("convert", "tiny", "--to", "native", tmp_path / "ck", "--skip", pattern),
                    "nothing left to quantize")
    assert not (tmp_path / "ck").exists()

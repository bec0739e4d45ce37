"""A new user's first runs: a missing or broken optional library never fails a row another kernel can
run, which rows can run is settled before any work, exit statuses say whether every requested row
ran, install hints are whole commands, and a run that is not on a terminal says what it is doing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.plugin import backend as registry
from quantbridge.plugin.availability import Availability, ask
from quantbridge.plugin.backend import Backend, Pairing
from quantbridge.plugin.errors import BackendUnavailable, UserError
from quantbridge.plugin.kernel import KERNELS, Kernel, choose, probe_weight
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.quantizer import QUANTIZERS, Quantizer
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.bench import failures
from quantbridge.run.compare import Settings, check_request, run_comparison

CPU = torch.device("cpu")
FAST = dict(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64)
ROOT = Path(__file__).resolve().parents[1]


def _weight(n=64, k=256, group=64, dtype=torch.float32, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    return quantize_rtn(torch.randn(n, k, generator=gen), QuantSpec(group_size=group), scale_dtype=dtype)


def _hide(tmp_path: Path, *modules: str) -> dict:
    """Environment for a subprocess (and the row processes it spawns) in which `modules` cannot be
    imported: a sitecustomize sets sys.modules[name] = None, as for a package that is not installed."""
    d = tmp_path / "hide"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _quantbridge(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantbridge.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# --- test kernels and backends, registered for one test at a time -------------------------------

calls: list[str] = []


class _Layer(QuantLinear):
    def __init__(self, weight, bias, kernel):
        super().__init__(weight.in_features, weight.out_features)
        self.w = weight.dequantize()
        self.kernel = kernel

    @property
    def weight_nbytes(self):
        return 0

    def dequantize(self):
        return self.w

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w.to(x.dtype))


class _NotInstalled(Kernel):
    name = "test-not-installed"
    install_hint = "pip install test-library"

    def available(self, device):
        return Availability(False, "test-library is not installed")

    def can_implement(self, weight, device, dtype):
        calls.append("can_implement of a kernel whose library is missing")
        import test_library_that_is_not_there  # noqa: F401  (what GPTQModel's can_implement did)
        return Availability(True, "")


class _RaisingAvailable(Kernel):
    name = "test-raising-available"

    def available(self, device):
        raise OSError("libfoo.so: cannot open shared object file")


class _RaisingCanImplement(Kernel):
    name = "test-raising-can-implement"

    def can_implement(self, weight, device, dtype):
        raise ModuleNotFoundError("No module named 'foo_kernels'")


class _BrokenBuild(Kernel):
    name = "test-broken-build"
    install_hint = "pip install foo"

    def build(self, weight, bias):
        raise ImportError("cannot import name 'gemm' from 'foo' (partially initialized)")


class _Works(Kernel):
    name = "test-works"

    def build(self, weight, bias):
        return _Layer(weight, bias, "test-works")


class _NoGroup32(Kernel):
    name = "test-no-g32"

    def can_implement(self, weight, device, dtype):
        if weight.group_size == 32:
            return Availability(False, "group size 32 is not supported (use --group-size 64)")
        return Availability(True, "")

    def build(self, weight, bias):
        return _Layer(weight, bias, "test-no-g32")


class _Calibrating(Quantizer):
    name = "test-calibrating"
    needs_calibration = True

    def quantize(self, model, linears, spec, calib):
        calls.append("calibrated")
        return {n: quantize_rtn(lin.weight.detach(), spec) for n, lin in linears.items()}


class _CalibratedG32Only(Pairing):
    name = "test-calibrated"
    quantizer = "test-calibrating"
    pinned = ("test-no-g32",)


class _CalibratedMissingKernel(Pairing):
    name = "test-calibrated-missing"
    quantizer = "test-calibrating"
    pinned = ("test-not-installed",)


class _Chain(Pairing):
    name = "test-chain"
    quantizer = "rtn"
    pinned = ("test-not-installed", "test-raising-available", "test-raising-can-implement", "test-broken-build",
              "test-works")


@pytest.fixture
def test_kernels():
    kernels = (_NotInstalled, _RaisingAvailable, _RaisingCanImplement, _BrokenBuild, _Works, _NoGroup32)
    backends = (_CalibratedG32Only, _CalibratedMissingKernel, _Chain)
    for k in kernels:
        KERNELS.register(k)
    QUANTIZERS.register(_Calibrating)
    for b in backends:
        registry.register(b)
    calls.clear()
    yield
    for k in kernels:
        KERNELS.classes.pop(k.name)
    QUANTIZERS.classes.pop(_Calibrating.name)
    for b in backends:
        registry.BACKENDS.classes.pop(b.name)


# --- 1. the chooser ---------------------------------------------------------------------------------

def test_chooser_passes_over_missing_raising_and_broken_kernels_with_their_reasons(test_kernels):
    w = _weight()
    layer = registry.get("test-chain").from_int4(w, None)
    assert layer.kernel == "test-works"
    why = dict(layer.rejected_kernels)
    assert why["test-not-installed"] == "test-library is not installed"
    assert why["test-raising-available"] == "available raised OSError: libfoo.so: cannot open shared object file"
    assert why["test-raising-can-implement"] == "can_implement raised ModuleNotFoundError: No module named 'foo_kernels'"
    assert why["test-broken-build"].startswith("its library failed to import (cannot import name 'gemm'")
    assert "pip install foo" in why["test-broken-build"]
    assert calls == []  # can_implement is never asked of a kernel whose library is missing
    x = torch.randn(3, w.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x.float()).double(), x @ w.dequantize().double().T, rtol=1e-5, atol=1e-5)


def test_backend_availability_survives_a_raising_check(test_kernels):
    a = registry.get("test-chain").available(CPU)
    assert a.ok and "test-works" in a.reason and "test-raising-available (available raised OSError" in a.reason
    assert ask(lambda: None).ok is False  # not an Availability: a no, never a crash


def test_gptq_row_runs_without_gptqmodel(tiny, monkeypatch):
    """The issue's case: GPTQModel missing, bf16 (where its torch layer would be the choice): the
    chooser passes over it and the row runs through the GPTQ layout kernel."""
    from quantbridge.models.load import load_model

    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # as when it is not installed
    w = _weight(dtype=torch.bfloat16)
    layer = registry.get("gptq").from_int4(w, None)
    assert "gptqmodel-torch" in dict(layer.rejected_kernels)
    assert dict(layer.rejected_kernels)["gptqmodel-torch"].startswith("gptqmodel is not installed")
    bf16 = load_model("tiny", CPU, torch.bfloat16)
    comp = run_comparison(bf16, ["gptq"], Settings(**FAST, weights="native"), CPU, torch.bfloat16)
    row = comp.backend("gptq")
    assert row.status == "ok", row.reason
    assert "gptqmodel-torch" in row.model_metrics["kernels_passed_over"]


def test_gptqmodel_found_but_not_importable_is_a_rejection(monkeypatch):
    """Installed with --no-deps but one of its own dependencies missing: find_spec finds it, the
    import fails; the chooser passes over it with the reason and the install command."""
    from quantbridge.adapters import gptqmodel

    def broken():
        raise ModuleNotFoundError("No module named 'pcre'")

    monkeypatch.setattr(gptqmodel, "import_layers", broken)
    monkeypatch.setattr(gptqmodel, "_version", lambda: "7.7.0")
    monkeypatch.setattr(gptqmodel, "find_spec", lambda name: object())
    c = choose(["gptqmodel-torch", "gptq-layout"], _weight(dtype=torch.bfloat16), CPU, torch.bfloat16)
    assert c.kernel.name == "gptq-layout"
    assert dict(c.rejected)["gptqmodel-torch"].startswith("gptqmodel does not import (No module named 'pcre')")


def test_no_adapter_imports_an_optional_library_outside_available_or_build():
    """Every registered kernel's `available` and `can_implement` answer on a machine where none of the
    optional libraries imports (a subprocess with them hidden): no exception escapes either."""
    code = (
        "import sys\n"
        "for m in ('gptqmodel','exllamav2','gemlite','awq','triton','bitsandbytes','llmcompressor','llama_cpp'):\n"
        "    sys.modules[m] = None\n"
        "import torch\n"
        "from quantbridge.plugin.kernel import KERNELS, kernel_names, probe_weight\n"
        "from quantbridge.plugin import backend as registry, resolve\n"
        "from quantbridge.plugin.spec import QuantSpec\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    w = probe_weight(64, 256, QuantSpec(group_size=64), dtype, torch.device('cpu'))\n"
        "    for n in kernel_names():\n"
        "        k = KERNELS.get(n)\n"
        "        a = k.available(torch.device('cpu'))\n"
        "        if a.ok:\n"
        "            k.can_implement(w, torch.device('cpu'), dtype)\n"
        "for n in registry.names():\n"
        "    resolve.backend(n, torch.device('cpu'))\n"
        "print('answered')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "answered" in r.stdout, r.stderr


# --- 2. which rows can run is settled before any work ------------------------------------------

def test_a_row_no_kernel_can_run_stops_before_calibration(tiny, test_kernels, monkeypatch):
    import quantbridge.run.compare as compare_module

    monkeypatch.setattr(compare_module, "run_reference", lambda *a, **k: calls.append("reference") or 1 / 0)
    s = Settings(**FAST, spec=QuantSpec(group_size=32))
    with pytest.raises(BackendUnavailable, match=r"row test-calibrated cannot run here: no kernel of test-calibrated "
                                                 r"can run layer .*group size 32 is not supported \(use --group-size "
                                                 r"64\).*--skip-unavailable"):
        run_comparison(tiny, ["native", "test-calibrated"], s, CPU, torch.float32)
    assert calls == []  # neither the reference nor the calibration ran


def test_skip_unavailable_records_such_a_row_without_calibrating(tiny, test_kernels):
    s = Settings(**FAST, spec=QuantSpec(group_size=32), skip_unavailable=True)
    comp = run_comparison(tiny, ["test-calibrated", "test-calibrated-missing"], s, CPU, torch.float32)
    rows = {b.name: b for b in comp.backends}
    assert rows["test-calibrated"].status == "unavailable" and "group size 32" in rows["test-calibrated"].reason
    assert rows["test-calibrated-missing"].status == "unavailable"
    assert "test-library is not installed" in rows["test-calibrated-missing"].reason
    assert "calibrated" not in calls
    # the same backend with weights its kernel can run: calibrates once and runs
    comp = run_comparison(tiny, ["test-calibrated"], Settings(**FAST, spec=QuantSpec(group_size=64), cache=False), CPU,
                          torch.float32)
    assert comp.backend("test-calibrated").status == "ok" and calls == ["calibrated"]


def test_kernel_rows_and_shared_weights_are_settled_before_work(tiny):
    with pytest.raises(BackendUnavailable, match=r"row native\+tinygemm: kernel tinygemm is unavailable"):
        check_request(tiny, ["native"], Settings(**FAST, weights="native", kernels=["tinygemm"]), CPU)
    with pytest.raises(BackendUnavailable, match=r"row bnb-nf4 cannot run here: bnb-nf4 cannot run native's INT4"):
        check_request(tiny, ["bnb-nf4"], Settings(**FAST, weights="native"), CPU)
    # No quantizer here makes act-order weights any more (rtn and llm-compressor refuse --act-order):
    # a desc_act checkpoint's kernels are settled on its own weights, as
    # test_compare_parts.test_act_order_checkpoint_runs_through_every_kernel shows.
    with pytest.raises(UserError, match="act-order"):
        check_request(tiny, ["gptq"], Settings(**FAST, weights="native", spec=QuantSpec(group_size=64, act_order=True)), CPU)


def test_probe_weight_has_the_specs_structure_and_costs_nothing():
    spec = QuantSpec(group_size=64, symmetric=True, act_order=True)
    w = probe_weight(28672, 8192, spec, torch.bfloat16, CPU)
    assert (w.out_features, w.in_features, w.group_size) == (28672, 8192, 64)
    assert w.scales.dtype == torch.bfloat16 and w.scales.shape == (28672, 128) and bool((w.zeros == 8).all())
    assert w.perm is not None and w.perm.shape == (8192,)
    assert w.qweight.untyped_storage().nbytes() == 1  # broadcast, not 117 MB
    per_channel = probe_weight(64, 256, QuantSpec(group_size=-1), torch.float32, CPU)
    assert per_channel.group_size == 256 and per_channel.scales.shape == (64, 1)


def test_missing_quantizer_library_is_a_one_line_error_before_loading_work(tmp_path):
    """compare with llm-compressor not installed: exit 2, one line naming the row and the command
    that installs it, nothing measured."""
    r = _quantbridge(["compare", "tiny", "--backends", "native,gptq", "--out", str(tmp_path / "run")],
                     _hide(tmp_path, "llmcompressor"), tmp_path)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(err) == 1 and "backend gptq is unavailable: llmcompressor " in err[0]
    assert "pip install 'quantbridge[gptq]' 'torch==" in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# --- 3. exit statuses -------------------------------------------------------------------------------

class _Boom(Backend):
    name = "test-boom-one"

    def quantize(self, linear, spec):
        raise RuntimeError("kernel exploded")


class _Missing(Backend):
    name = "test-missing-one"
    install_hint = "pip install missing-lib"

    def available(self, device):
        return Availability(False, "missing-lib is not installed")


@pytest.fixture
def failing_backends():
    for cls in (_Boom, _Missing):
        registry.register(cls)
    yield
    for cls in (_Boom, _Missing):
        registry.BACKENDS.classes.pop(cls.name)


def _compare(tmp_path, *args):
    return CliRunner().invoke(cli, ["compare", "tiny", "--batch", "1", "--prefill", "0", "--runs", "5", "--warmup",
                                    "0", "--eval-seqs", "1", "--eval-len", "32", "--no-report", "--isolation", "none",
                                    "--out", str(tmp_path / "run"), *args])


def test_one_failed_row_among_good_ones_exits_1_after_writing(tmp_path, failing_backends):
    r = _compare(tmp_path, "--backends", "native,test-boom-one", "-q")
    assert r.exit_code == 1, r.output
    err = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert err == [line for line in err if "test-boom-one" in line] and len(err) == 1
    assert "failed: RuntimeError: kernel exploded" in err[0] and "; fix: " in err[0]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {b["name"]: b["status"] for b in saved["backends"]} == {"fp16": "ok", "native": "ok",
                                                                    "test-boom-one": "failed"}


def test_every_row_ran_exits_0_and_skipped_on_request_does_not_count(tmp_path, failing_backends):
    r = _compare(tmp_path, "--backends", "native", "-q")
    assert r.exit_code == 0, r.output
    r = _compare(tmp_path, "--backends", "native,test-missing-one", "-q")
    assert r.exit_code == 2 and "pip install missing-lib" in r.output  # refused before any work
    r = _compare(tmp_path, "--backends", "native,test-missing-one", "--skip-unavailable", "-q")
    assert r.exit_code == 0, r.output


def test_help_documents_the_exit_statuses():
    for command in ("compare", "bench"):
        r = CliRunner().invoke(cli, [command, "--help"])
        assert "Exit status: 0 every requested row" in r.output and "1 the results were written" in r.output


def test_bench_counts_unavailable_rows_only_when_named():
    rows = [dict(backend=b, k=512, n=512, m=m, status=s, reason=why) for b, s, why in (
        ("fp16", "ok", None), ("tinygemm", "unavailable", "CUDA only"), ("native", "failed", "RuntimeError: x"),
        ("rtn+exllamav2", "unavailable", "exllamav2 is not installed")) for m in (1, 16)]
    # bench.json: whether a row's library loaded, and a kernel row's kernel
    res = {"rows": rows, "backends": {"rtn+exllamav2": {"kernel": "exllamav2", "available": False}}}
    lines = failures(res, named=set())
    assert len(lines) == 1 and lines[0].startswith("row native failed on 2 of 2 shape/M cases")
    lines = failures(res, named={"tinygemm", "rtn+exllamav2"})
    assert [line.split()[1] for line in lines] == ["tinygemm", "native", "rtn+exllamav2"]
    assert "fix: install its library: pip install 'quantbridge[exllamav2]'" in lines[2]


def test_bench_fix_of_a_loaded_kernel_that_refuses_a_case_is_not_an_install():
    """exllamav2 installed and asked for bf16 (it takes fp16): the fix is the reason's, not a pip install."""
    rows = [dict(backend="rtn+exllamav2", k=512, n=512, m=1, status="unavailable",
                 reason="fp16 activations only, not bfloat16 (use --dtype fp16)")]
    res = {"rows": rows, "backends": {"rtn+exllamav2": {"kernel": "exllamav2", "available": True}}}
    (line,) = failures(res, named={"rtn+exllamav2"})
    assert "pip install" not in line and "(use --dtype fp16); fix: leave it out of --backends/--kernels" in line
    assert failures({"rows": rows[:2]}, named={"fp16"}) == []


# --- 5. install hints whole ---------------------------------------------------------------------

def test_env_prints_every_install_hint_whole_on_a_narrow_pipe(tmp_path):
    env = _hide(tmp_path, "bitsandbytes", "llama_cpp", "gptqmodel", "llmcompressor", "exllamav2", "gemlite", "awq")
    env["COLUMNS"] = "40"
    hints = json.loads(_quantbridge(["env", "--json"], env, tmp_path).stdout)
    wanted = {r["install"] for s in ("backends", "quantizers", "kernels") for r in hints[s] if r["install"]}
    assert any("CMAKE_ARGS=" in h for h in wanted) and any("'quantbridge[gptq]'" in h for h in wanted)
    out = _quantbridge(["env"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = {line.strip() for line in out.stdout.splitlines()}
    for hint in wanted:
        assert hint in lines, hint  # whole, on a line of its own, however narrow the output
        assert "…" not in hint and "\n" not in hint


def test_install_hints_are_commands_that_keep_torch():
    from quantbridge.adapters import _llmcompressor, bnb

    public = torch.__version__.split("+")[0]
    assert _llmcompressor.INSTALL_HINT == f"pip install 'quantbridge[gptq]' 'torch=={public}'"
    assert registry.get("bnb-nf4").install_hint == f"pip install 'quantbridge[bnb]' 'torch=={public}'"
    assert registry.get("awq").install_hint == f"pip install 'quantbridge[awq]' 'torch=={public}'"
    assert bnb  # imported: the hint is its class attribute


# --- 6. the per-layer table on request --------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    from quantbridge.results.schema import save_json

    comp = run_comparison(tiny, ["native"], Settings(**FAST), CPU, torch.float32)
    path = tmp_path_factory.mktemp("layers") / "results.json"
    save_json(comp, path)
    return path, comp


def test_summary_and_recommendation_lead_and_layers_are_shortened(saved):
    path, comp = saved
    out = CliRunner().invoke(cli, ["report", str(path)]).output
    summary, rec, layers = (out.index("whole model"), out.index("recommendation, from this run's numbers"),
                            out.index("per layer: isolated rel. error"))
    assert summary < rec < layers
    native = comp.backend("native")
    shown = [r for r in native.layers if f"│ {r.name} " in out]
    assert len(shown) == 10
    assert (f"10 of {len(native.layers)} layers shown, those with the largest isolated error; every layer: "
            f"quantbridge report {path} --layers\n") in out
    worst = sorted((r.error["rel_isolated"] for r in native.layers if r.quantized), reverse=True)[:10]
    assert sorted((r.error["rel_isolated"] for r in shown), reverse=True) == worst


def test_layers_flag_prints_every_layer_and_no_layers_none(saved):
    path, comp = saved
    out = CliRunner().invoke(cli, ["report", str(path), "--layers"]).output
    assert all(f"│ {r.name} " in out for r in comp.backend("native").layers) and "layers shown" not in out
    out = CliRunner().invoke(cli, ["report", str(path), "--no-layers"]).output
    assert "per layer:" not in out and "whole model" in out


# --- 8. a line per stage where the output is not a terminal ----------------------------------

def test_stage_lines_when_not_a_terminal_and_quiet_under_quiet(tmp_path):
    r = _compare(tmp_path, "--backends", "native", "--no-layers")
    assert r.exit_code == 0, r.output
    for stage in ("] loading tiny", "] reference: the unquantized model on the inputs", "] native: build layers",
                  "] native: timing (eager)", "] row fp16: ok", "] row native: ok"):
        assert stage in r.output, stage
    r = _compare(tmp_path, "--backends", "native", "-q")
    assert r.exit_code == 0 and "loading tiny" not in r.output and "row native" not in r.output

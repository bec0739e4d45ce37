"""The parts of a comparison one by one: row planning, weight sources, timing modes, metrics, verdicts."""

import csv
import io
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantbridge.cli import cli
from quantbridge.measure import timing
from quantbridge.measure.probes import L2Flush
from quantbridge.models.checkpoint import load_quantized, save_quantized
from quantbridge.models.load import linear_layers
from quantbridge.plugin import backend as registry
from quantbridge.plugin.backend import Backend
from quantbridge.plugin.errors import BackendUnavailable, UserError
from quantbridge.plugin.packed import canonical_perm, quantize_rtn
from quantbridge.plugin.spec import QuantSpec
from quantbridge.results.schema import BackendResult, Comparison, save_json
from quantbridge.run.compare import Settings, check_request, run_comparison, verdict
from quantbridge.run.measure_row import timing_metrics
from quantbridge.run.rows import NotRunnable, WeightSource, row_layers
from quantbridge.run.rowspec import Shared
from quantbridge.run.settings import timing_mode

FAST = dict(batches=[1, 4], prefill=16, runs=5, warmup=1, eval_seqs=1, eval_len=64)
CPU = torch.device("cpu")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


def _step(model: nn.Module, runs: int = 6, warmup: int = 2) -> timing.Step:
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs = [torch.randn(4, 64) for _ in range(warmup + runs)]
    return timing.Step(model, lambda mod, x: mod(x), inputs, warmup, lins, CPU, L2Flush(CPU))


def test_eager_step_on_cpu_times_layers_and_host_cost():
    t = timing.time_step("eager", _step(_mlp(0)))
    assert t.mode == "eager" and t.label == "eager (CPU, synchronous)"
    assert set(t.layer_us) == set(t.host_us) == {"0", "2"}
    for n in t.layer_us:
        assert len(t.layer_us[n]) == len(t.host_us[n]) == 6
        # On the CPU the host clock runs strictly inside the layer's two marks.
        assert all(0 < h <= d for h, d in zip(t.host_us[n], t.layer_us[n]))
    assert len(t.step_us) == len(t.step_probed_us) == 6 and min(t.step_us) > 0


def test_fallback_when_a_mode_cannot_capture(monkeypatch):
    def refuse(step):
        raise timing.NotCapturable("not capturable: forward synchronises with the host")

    monkeypatch.setitem(timing.TIMERS, "graph", refuse)
    t = timing.time_step("graph", _step(_mlp(1)))
    assert t.mode == "eager" and t.layer_us  # the row is still timed, eagerly
    monkeypatch.setitem(timing.TIMERS, "compile", lambda step: refuse(step))
    assert timing.time_step("compile", _step(_mlp(2))).mode == "eager"


def test_labels_say_why_a_mode_fell_back():
    why = ["not capturable: CUDA error: operation not permitted when stream is capturing"]
    assert timing.describe("eager", why, "cuda") == f"eager ({why[0]})"
    assert timing.describe("graph", [], "cuda") == "graph"
    assert timing.describe("eager", why, "cpu").startswith("eager (CPU")


def test_timing_mode_resolution():
    assert timing_mode("auto", CPU) == "eager"
    assert timing_mode("graph", torch.device("cuda")) == "graph"
    assert timing_mode("auto", torch.device("cuda")) == "graph"
    with pytest.raises(UserError, match="needs a CUDA device"):
        timing_mode("graph", CPU)
    with pytest.raises(UserError, match="--mode"):
        Settings(mode="fast")


def test_timing_metrics_remainder_and_tokens_per_s():
    """Synthetic graph timings: remainder = unprobed step minus Σ layers; the probes' cost per layer apart."""
    layers = {"a": [10.0, 11.0, 12.0, 13.0, 14.0], "b": [5.0, 5.0, 6.0, 6.0, 7.0]}
    span = [30.0, 31.0, 33.0, 34.0, 36.0]
    # Two probed graphs, one layer each: +1 µs and +3 µs over the 25 µs plain step.
    by_graph = [[26.0] * 5, [28.0] * 5]
    t = timing.StepTiming("graph", "graph", layers, {"a": [30.0] * 5, "b": [31.0] * 5},
                          step_us=[25.0] * 5, step_probed_us=[x for g in by_graph for x in g], span_us=span,
                          probed_by_graph=by_graph, probed_layers_by_graph=[1, 1])
    m = timing_metrics({4: t}, Settings(batches=[4], prefill=0).steps)
    assert m["linear_sum_us"]["4"]["median"] == 18.0
    assert m["step_remainder_us"]["4"] == pytest.approx(25.0 - 18.0)
    assert m["probe_cost_per_layer_us"]["4"] == pytest.approx(2.0)  # the median of 1 and 3
    assert m["probe_graphs"]["4"] == 2
    assert m["tokens_per_s"]["4"] == pytest.approx(4e6 / 25.0)
    assert m["probe_overhead_pct"]["4"] == pytest.approx(12.0)  # the costliest graph's
    assert m["timing"]["4"] == "graph" and m["decode_tokens_per_s"] == {"4": m["tokens_per_s"]["4"]}


@pytest.mark.parametrize("n,step_us,per_layer_us", [(211, 1500.0, 2.3), (14, 400.0, 2.3), (7, 10_000.0, 1.1),
                                                    (30, 50.0, 5.0)])
def test_probe_groups_keep_each_graph_within_the_budget(n, step_us, per_layer_us):
    names = [f"layer{i}" for i in range(n)]
    groups = timing.probe_groups(names, step_us, per_layer_us)
    assert sorted(x for g in groups for x in g) == sorted(names)  # every layer probed exactly once
    biggest = max(len(g) for g in groups)
    assert biggest == 1 or biggest * per_layer_us <= timing.PROBE_BUDGET * step_us
    assert len(groups) == -(-n // max(1, int(timing.PROBE_BUDGET * step_us / per_layer_us)))  # no more than needed
    assert timing.probe_groups(names, step_us, 0.0) == [names]  # probes that cost nothing: one graph


def test_compare_records_mode_host_cost_and_timing(tiny):
    comp = run_comparison(tiny, ["native"], Settings(**FAST), CPU, torch.float32)
    assert comp.settings["mode"] == "eager"
    for b in comp.backends:
        assert b.status == "ok" and b.timing == "eager (CPU, synchronous)"
        for r in b.layers:
            assert set(r.host_us) == set(r.latency_us) == {"1", "4", "16"}
            assert all(0 < r.host_us[m]["median"] <= r.latency_us[m]["median"] for m in r.host_us)
        assert set(b.model_metrics["linear_sum_us"]) == {"1", "4", "16"}
    again = Comparison.from_dict(json.loads(json.dumps(comp.to_dict())))
    assert again.backends[1].timing == comp.backends[1].timing
    assert again.backends[1].layers[0].host_us == comp.backends[1].layers[0].host_us


def test_schema_v1_results_still_render(tiny, tmp_path):
    comp = run_comparison(tiny, ["native"], Settings(**{**FAST, "batches": [1], "prefill": 0}), CPU, torch.float32)
    d = comp.to_dict()
    d["schema_version"] = 1
    for b in d["backends"]:
        b.pop("timing")
        b.pop("role")  # files before roles: the reference is found by its name
        for r in b["layers"]:
            r.pop("host_us")
    (tmp_path / "v1.json").write_text(json.dumps(d))
    old = Comparison.from_dict(d)
    assert old.backends[1].timing == "eager (schema v1)" and old.backends[1].layers[0].host_us == {}
    assert old.reference().name == "fp16" and old.backends[1].role == "measured"
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "v1.json"), "--md", str(tmp_path / "r.md")])
    assert r.exit_code == 0, r.output
    assert "native" in (tmp_path / "r.md").read_text()


def test_verdict_names_every_row_that_did_not_run_with_its_fix():
    ok = BackendResult(name="fp16", status="ok", role="reference")
    bad = BackendResult(name="native", status="failed", reason="RuntimeError: boom")
    gone = BackendResult(name="gptq", status="failed", reason="ModuleNotFoundError: No module named 'llmcompressor'")
    skipped = BackendResult(name="bnb-nf4", status="unavailable", reason="bitsandbytes is not installed")
    lines = verdict(Comparison(model={}, device={}, settings={}, backends=[ok, BackendResult("awq", "ok"), bad, gone]))
    assert len(lines) == 2 and lines[0].startswith("row native failed: RuntimeError: boom; fix: rerun with --debug")
    assert lines[1].startswith("row gptq failed") and "fix: install its library: pip install 'quantbridge[gptq]'" in lines[1]
    assert verdict(Comparison(model={}, device={}, settings={}, backends=[ok, BackendResult("native", "ok")])) == []
    # a row left out under --skip-unavailable was skipped on request; without the flag it did not run
    assert verdict(Comparison(model={}, device={}, settings={"skip_unavailable": True}, backends=[ok, skipped])) == []
    assert verdict(Comparison(model={}, device={}, settings={}, backends=[ok, skipped]))[0].startswith(
        "row bnb-nf4 could not run: bitsandbytes is not installed; fix: ")
    c = Comparison(model={}, device={}, settings={}, backends=[BackendResult("fp16", "failed", reason="x", role="reference"), bad])
    assert verdict(c)[0].startswith("row fp16 (the reference every row is measured against) failed: x")


def test_nonfinite_reference_fails_every_row_and_names_the_tensor(tiny):
    w = tiny.model.model.layers[1].mlp.up_proj.weight
    saved = w.data[3, 5].item()
    w.data[3, 5] = float("nan")
    try:
        comp = run_comparison(tiny, ["native"], Settings(**{**FAST, "batches": [1], "prefill": 0}), CPU, torch.float32)
    finally:
        w.data[3, 5] = saved
    assert [b.status for b in comp.backends] == ["failed", "failed"]
    assert "model.layers.1.mlp.up_proj.weight" in comp.backends[0].reason
    assert verdict(comp)[0].startswith("row fp16 (the reference every row is measured against) failed")
    assert "NaN or Inf" in verdict(comp)[1]


def _source(tiny, spec=QuantSpec(), checkpoint=None):
    lins = {n: m for n, m in linear_layers(tiny.model).items() if n != "lm_head"}
    return WeightSource(model=tiny.model, linears=lins, spec=spec, model_key="tiny", tokenizer=tiny.tokenizer,
                        device=CPU, dtype=torch.float32, checkpoint=checkpoint)


def test_weight_source_makes_weights_once(tiny):
    src = _source(tiny)
    first = src.get("native")
    assert src.get("native") is first  # kept, not remade
    w = tiny.model.model.layers[0].self_attn.q_proj.weight
    ref = quantize_rtn(w.detach(), QuantSpec(), scale_dtype=w.dtype)
    assert torch.equal(first["model.layers.0.self_attn.q_proj"].qweight, ref.qweight)


def test_row_layers_own_and_shared_weights(tiny):
    src = _source(tiny)
    layers, label = row_layers("native", src, None)
    assert label == "rtn" and set(layers) == set(src.linears)
    layers, label = row_layers("native", src, Shared("native"))
    assert label == "native (shared)"
    with pytest.raises(NotRunnable, match="cannot run native's INT4 weights"):
        row_layers("bnb-nf4", src, Shared("native"))
    layers, label = row_layers("fp16", src, Shared("native"))
    assert label == "unquantized"


class _Synchronising(Backend):
    """A kernel that reads a device value on the host every call (bnb-int8 does): never capturable."""

    name = "test-sync"

    def quantize(self, linear, spec):
        q = registry.get("fp16").quantize(linear, spec)
        inner = q.forward

        def forward(x):
            y = inner(x)
            float(y.abs().max())  # a host read: a synchronisation
            return y

        q.forward = forward
        q.kernel = "test-sync"
        return q


@pytest.mark.gpu
def test_graph_mode_times_layers_inside_the_step_and_falls_back_for_a_syncing_backend():
    from quantbridge.models.load import load_model

    dev = torch.device("cuda")
    registry.register(_Synchronising)
    try:
        loaded = load_model("tiny", dev, torch.bfloat16)
        comp = run_comparison(loaded, ["native", "test-sync"], Settings(**FAST), dev, torch.bfloat16)
    finally:
        registry.BACKENDS.classes.pop("test-sync")
    fp16, native, sync = comp.backends
    assert comp.settings["mode"] == "graph"
    for b in (fp16, native):
        assert b.status == "ok" and b.timing == "graph", (b.name, b.reason, b.timing)
        for m in ("1", "4", "16"):
            step = b.model_metrics["forward_us"][m]["median"]
            lsum = b.model_metrics["linear_sum_us"][m]["median"]
            assert 0 < lsum < step and b.model_metrics["step_remainder_us"][m] == pytest.approx(step - lsum)
            assert b.model_metrics["in_graph_span_us"][m]["median"] > lsum
            assert all(r.latency_us[m]["median"] > 0 and r.host_us[m]["median"] > 0 for r in b.layers)
    assert sync.status == "ok" and sync.timing.startswith("eager (not capturable:"), (sync.reason, sync.timing)
    assert torch.isfinite(torch.randn(8, device=dev)).all()  # the failed capture left the generator usable


def test_act_order_checkpoint_runs_through_every_kernel_that_can(tiny, tmp_path):
    """A desc_act GPTQ checkpoint (g_idx) made elsewhere: no --act-order was asked for, so no spec refusal."""
    from quantbridge import formats

    gen = torch.Generator().manual_seed(7)
    lins = {n: m for n, m in linear_layers(tiny.model).items() if n != "lm_head"}
    spec = QuantSpec(act_order=True)
    weights = {n: canonical_perm(quantize_rtn(m.weight.detach(), spec, scale_dtype=torch.float32,
                                              perm=torch.randperm(m.in_features, generator=gen)))
               for n, m in lins.items()}
    out = save_quantized(tmp_path / "act", tiny.model, tiny.tokenizer, weights, formats.get("gptq"), spec)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["desc_act"] is True
    loaded = load_quantized(out, CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="row awq cannot run here: .*act-order.*--skip-unavailable"):
        check_request(loaded, ["native", "gptq", "awq"], Settings(**FAST), CPU)  # settled before any work
    comp = run_comparison(loaded, ["native", "gptq", "awq"],
                          Settings(**{**FAST, "batches": [1], "prefill": 0, "skip_unavailable": True}), CPU,
                          torch.float32)
    for name in ("native", "gptq"):
        b = comp.backend(name)
        assert b.status == "ok", (name, b.reason)
        assert max(r.error["rel_isolated"] for r in b.layers if r.quantized) < 1e-5
    awq = comp.backend("awq")
    assert awq.status == "unavailable" and "act-order" in awq.reason
    assert check_request(loaded, ["gptq"], Settings(**FAST), CPU).spec.act_order


def test_cli_mode_graph_on_cpu_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(cli, ["compare", "tiny", "--mode", "graph", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "needs a CUDA device" in r.output
    assert not any(tmp_path.iterdir())  # no run directory, lock or staging directory was made


def test_results_files_hold_host_cost_columns(tiny, tmp_path):
    from quantbridge.results.schema import to_csv

    comp = run_comparison(tiny, [], Settings(**{**FAST, "batches": [1], "prefill": 0}), CPU, torch.float32)
    save_json(comp, tmp_path / "r.json")
    header, first = list(csv.reader(io.StringIO(to_csv(comp))))[:2]
    assert "host_median_us" in header and "timing" in header
    row = dict(zip(header, first))
    assert math.isfinite(float(row["host_median_us"])) and row["timing"].startswith("eager")


class _Exploding(Backend):
    name = "test-boom"

    def quantize(self, linear, spec):
        raise RuntimeError("kernel exploded")


def test_cli_exits_non_zero_when_every_requested_row_failed(tmp_path):
    registry.register(_Exploding)
    try:
        r = CliRunner().invoke(cli, ["compare", "tiny", "--backends", "test-boom", "--batch", "1", "--prefill", "0",
                                     "--runs", "5", "--warmup", "0", "--eval-seqs", "1", "--eval-len", "32",
                                     "--no-report", "-q", "--out", str(tmp_path / "run")])
    finally:
        registry.BACKENDS.classes.pop("test-boom")
    assert r.exit_code == 1, r.output
    assert "Error: row test-boom failed: RuntimeError: kernel exploded" in r.output and "fix: " in r.output
    assert (tmp_path / "run" / "results.json").is_file()  # what ran is still written


def test_calibration_size_defaults_per_device():
    from quantbridge.run.settings import CALIB_CPU, CALIB_FULL, calibration_size

    gpu = torch.device("cuda")
    assert calibration_size(None, None, CPU) == (*CALIB_CPU, "CPU default")
    assert calibration_size(None, None, gpu) == (*CALIB_FULL, "full")
    assert calibration_size(None, None, CPU, full=True) == (*CALIB_FULL, "full")
    assert calibration_size(8, 64, CPU, full=True) == (8, 64, "as given")
    assert calibration_size(8, None, CPU) == (8, CALIB_CPU[1], "as given, else the CPU default")
    assert Settings(calib_samples=4).calibration(CPU)[:2] == (4, CALIB_CPU[1])

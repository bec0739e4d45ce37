"""A whole comparison on the tiny model: schema, one record per linear, plausible errors, isolation."""

import math

import pytest
import torch

from quantbridge.models.load import linear_layers
from quantbridge.plugin import backend as registry
from quantbridge.plugin.availability import Availability
from quantbridge.plugin.backend import Backend
from quantbridge.plugin.errors import BackendUnavailable, UserError
from quantbridge.plugin.spec import QuantSpec
from quantbridge.results.schema import Comparison
from quantbridge.run.compare import Settings, run_comparison

FAST = dict(batches=[1, 4], prefill=32, runs=5, warmup=1, eval_seqs=1, eval_len=64)


def _run(tiny, names, **kw):
    s = Settings(**{**FAST, **kw})
    return run_comparison(tiny, names, s, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def comp(tiny):
    return _run(tiny, ["fp16", "native"])


def test_every_layer_every_backend(comp, tiny):
    names = list(linear_layers(tiny.model))
    assert [b.name for b in comp.backends] == ["fp16", "native"]
    for b in comp.backends:
        assert b.status == "ok", b.reason
        assert [r.name for r in b.layers] == names
        for r in b.layers:
            assert set(r.latency_us) == {"1", "4", "32"}
            assert all(v["n"] == 5 and 0 < v["p10"] <= v["median"] <= v["p90"] for v in r.latency_us.values())


def test_errors_plausible(comp):
    fp16, native = comp.backends
    assert all(r.error["rel_isolated"] == 0 and r.error["rel_propagated"] == 0 for r in fp16.layers)
    q = [r.error["rel_isolated"] for r in native.layers if r.quantized]
    med = sorted(q)[len(q) // 2]
    assert 1e-3 < med < 0.2
    assert native.kernel == "reference-torch"
    # lm_head is kept unquantized by default: no error of its own, but it inherits the rest
    head = native.layers[-1]
    assert not head.quantized and head.error["rel_isolated"] == 0 and head.error["rel_propagated"] > 1e-3
    for r in native.layers:
        if r.quantized:  # SQNR and cosine agree with the relative error
            assert r.error["sqnr_db"] == pytest.approx(-20 * math.log10(r.error["rel_isolated"]), rel=1e-6)
            assert 0.9 < r.error["cosine"] < 1


def test_weight_bytes_and_bits(comp, tiny):
    fp16, native = comp.backends
    assert fp16.weight_bytes == sum(m.weight.numel() * 4 for m in linear_layers(tiny.model).values())
    assert fp16.bits_per_weight == 32
    # 4-bit codes + fp32 scale + uint8 zero per 128 weights
    assert native.bits_per_weight == pytest.approx(4 + 32 / 128 + 8 / 128)
    assert native.weight_bytes < fp16.weight_bytes / 2


def test_probe_overhead_measured(comp):
    for b in comp.backends:
        m = b.model_metrics
        assert set(m["forward_us"]) == set(m["probe_overhead_pct"]) == {"1", "4", "32"}
        assert all(math.isfinite(v) for v in m["probe_overhead_pct"].values())
        assert m["eval_ppl"] > 1


def test_every_row_times_the_fixed_work_before_and_after(comp):
    from quantbridge.results.recommend import timing_drift

    for b in comp.backends:
        check = b.model_metrics["machine_check"]
        assert "host clock" in check["clock"]  # on the CPU
        (work,) = check["work"].values()
        assert "F.linear" in work["work"] and work["before_us"] > 0 and work["after_us"] > 0
    assert timing_drift(comp) >= 0


def test_json_round_trip(comp):
    again = Comparison.from_dict(comp.to_dict())
    assert again.to_dict() == comp.to_dict()


class _Exploding(Backend):
    name = "test-exploding"

    def quantize(self, linear, spec, calib=None):
        raise RuntimeError("kernel exploded")


class _NaN(Backend):
    name = "test-nan"

    def quantize(self, linear, spec, calib=None):
        q = registry.get("fp16").quantize(linear, spec)
        q.forward = lambda x: torch.full((*x.shape[:-1], linear.out_features), float("nan"))
        return q


class _Missing(Backend):
    name = "test-missing"
    install_hint = "pip install quantbridge[missing]"

    def available(self, device):
        return Availability(False, "library 'missing' is not installed")


@pytest.fixture
def fake_backends():
    for cls in (_Exploding, _NaN, _Missing):
        registry.register(cls)
    yield
    for cls in (_Exploding, _NaN, _Missing):
        registry.BACKENDS.classes.pop(cls.name)


def test_failing_backend_does_not_take_others_down(tiny, fake_backends):
    comp = _run(tiny, ["test-exploding", "native", "test-nan", "test-missing"], skip_unavailable=True, runs=5)
    status = {b.name: (b.status, b.reason) for b in comp.backends}
    assert status["native"][0] == "ok" and status["fp16"][0] == "ok"
    assert status["test-exploding"][0] == "failed" and "kernel exploded" in status["test-exploding"][1]
    assert status["test-nan"][0] == "failed" and "non-finite" in status["test-nan"][1]
    assert status["test-missing"] == ("unavailable", "library 'missing' is not installed")


def test_unavailable_backend_is_an_error_by_default(tiny, fake_backends):
    with pytest.raises(BackendUnavailable, match=r"pip install quantbridge\[missing\].*--skip-unavailable"):
        _run(tiny, ["test-missing"])


def test_group_size_must_divide(tiny):
    from torch import nn

    odd = tiny.model.model.layers[0].mlp
    saved = odd.down_proj
    odd.down_proj = nn.Linear(96, 256)  # in_features not divisible by 128
    try:
        with pytest.raises(UserError, match="group size 128 does not divide in_features=96"):
            _run(tiny, ["native"], spec=QuantSpec(group_size=128))
    finally:
        odd.down_proj = saved

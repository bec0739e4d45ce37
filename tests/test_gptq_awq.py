"""GPTQ and AWQ through llm-compressor: every backend on the tiny model, weights read back
exactly, AWQ's folded factors recovered, calibrated weights cached, shared-weights runs."""

import pytest
import torch

pytest.importorskip("llmcompressor")
pytest.importorskip("bitsandbytes")

from quantbridge.models.load import linear_layers  # noqa: E402
from quantbridge.models.text import calibration  # noqa: E402
from quantbridge.plugin import backend as registry  # noqa: E402
from quantbridge.plugin.packed import Int4Weight, quantize_rtn  # noqa: E402
from quantbridge.plugin.quantizer import Calibration  # noqa: E402
from quantbridge.plugin.smoothing import SmoothedLinear  # noqa: E402
from quantbridge.plugin.spec import QuantSpec  # noqa: E402
from quantbridge.run.compare import Settings, run_comparison  # noqa: E402

FAST = dict(batches=[1, 4], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=128)
ALL = ["bnb-nf4", "bnb-fp4", "gptq", "awq", "native"]


@pytest.fixture(scope="module")
def all_five(tiny, tmp_path_factory):
    # The full calibration (128 x 512 tokens of the shipped text, the GPU default): on tiny's
    # random weights GPTQ needs Hessians that well estimated to beat RTN on every layer.
    s = Settings(**FAST, cache=False, full_calibration=True)
    return run_comparison(tiny, ALL, s, torch.device("cpu"), torch.float32)


def test_all_five_backends_ok(all_five, tiny):
    n_linear = len(linear_layers(tiny.model))
    assert [b.name for b in all_five.backends] == ["fp16", *ALL]
    for b in all_five.backends:
        assert b.status == "ok", (b.name, b.reason)
        assert len(b.layers) == n_linear
    kinds = {b.name: (b.weights, b.kernel) for b in all_five.backends}
    assert kinds["gptq"] == ("gptq", "reference-torch")
    assert kinds["awq"][0] == "awq" and kinds["awq"][1].startswith("reference-torch")
    assert kinds["bnb-nf4"][1] == "bitsandbytes.matmul_4bit[cpu]"


def test_gptq_beats_rtn_on_every_layer(all_five):
    """GPTQ minimises each layer's output error on calibration-like inputs; RTN does not."""
    gptq, native = all_five.backend("gptq"), all_five.backend("native")
    rtn = {r.name: r.error["rel_isolated"] for r in native.layers if r.quantized}
    for r in gptq.layers:
        if r.quantized:
            assert r.error["rel_isolated"] < rtn[r.name], r.name
    vs = gptq.model_metrics["isolated_error_vs_native"]
    assert vs["layers_lower"] == vs["layers"] == len(rtn) and vs["median_ratio"] < 0.95
    assert any(f.startswith("gptq (gptq weights): isolated error below native RTN on every layer") for f in all_five.findings)


def test_awq_error_plausible(all_five):
    errs = sorted(r.error["rel_isolated"] for r in all_five.backend("awq").layers if r.quantized)
    assert 1e-3 < errs[len(errs) // 2] < 0.2


@pytest.fixture(scope="module")
def small_calib(tiny):
    return calibration(tiny.tokenizer, 8, 64)


def test_gptq_act_order_is_a_clear_error():
    from quantbridge.plugin.errors import UserError

    with pytest.raises(UserError, match="desc_act"):
        registry.get("gptq").check_spec(QuantSpec(act_order=True))


@pytest.mark.parametrize("group_size", [64, -1])
def test_gptq_weights_read_back_exactly(tiny, small_calib, group_size, monkeypatch):
    """The canonical weight dequantizes to the fake-quantized weight llm-compressor leaves."""
    from quantbridge.adapters import _llmcompressor as llmc

    spec = QuantSpec(group_size=group_size)
    lins = {n: m for n, m in linear_layers(tiny.model).items() if n.startswith("model.layers.1.")}
    seen = {}
    real = llmc.oneshot
    monkeypatch.setattr(llmc, "oneshot", lambda *a: seen.setdefault("work", real(*a)))
    ws = registry.get("gptq").quantize_weights(tiny.model, lins, spec, small_calib)
    assert set(ws) == set(lins)
    for n, w in ws.items():
        assert w.perm is None and w.group_size == (w.in_features if group_size == -1 else group_size)
        ref = seen["work"].get_submodule(n).weight.detach().double()
        torch.testing.assert_close(w.dequantize(torch.float64), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    # the caller's model is untouched
    assert not hasattr(tiny.model.get_submodule(next(iter(lins))), "weight_scale")


def test_awq_unfold_recovers_scaling():
    from quantbridge.adapters.awq import unfold_scales

    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g)
    r, c = torch.rand(48, generator=g) + 0.5, torch.rand(96, generator=g) * 3 + 0.1
    c2, r2 = unfold_scales(w, r.unsqueeze(1) * w * c)
    torch.testing.assert_close((r2.unsqueeze(1) * c2).double(), (r.unsqueeze(1) * c).double(), rtol=1e-5, atol=0)
    bad = r.unsqueeze(1) * w * c
    bad[0, :10] += 1.0
    with pytest.raises(RuntimeError, match="beyond per-channel scaling"):
        unfold_scales(w, bad)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_smoothed_linear_against_float64(dtype, tol):
    """y = W'(x / c) / r + b equals the float64 product with the unfolded weight (bf16: the factors
    divide in fp32, so the error is bf16 rounding of x, y and the kernel's, not of the factors)."""
    g = torch.Generator().manual_seed(2)
    w = quantize_rtn(torch.randn(32, 128, generator=g), QuantSpec(group_size=32), scale_dtype=dtype)
    c, r = torch.rand(128, generator=g) + 0.5, torch.rand(32, generator=g) + 0.5
    bias = torch.randn(32, generator=g)
    layer = SmoothedLinear(registry.get("native").from_int4(w, None), c, r, bias.to(dtype))
    x = torch.randn(5, 128, generator=g).to(dtype)
    w64 = w.dequantize(torch.float64) / c.double() / r.double().unsqueeze(1)
    y = layer(x)
    assert y.dtype == dtype
    # an activation that carries gradients (a model called outside no_grad) takes the same values
    torch.testing.assert_close(layer(x.clone().requires_grad_()).detach(), y, rtol=0, atol=0)
    torch.testing.assert_close(y.double(), x.double() @ w64.T + bias.to(dtype).double(), rtol=tol, atol=tol)
    torch.testing.assert_close(layer.dequantize().double(), w64, rtol=1e-6, atol=1e-7)


def test_calibrated_weights_are_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(tmp_path))
    calls = []
    gptq = type(registry.get("gptq"))
    real = gptq.quantize_weights

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(gptq, "quantize_weights", counting)
    s = dict(**FAST, calib_samples=8, calib_len=64)
    first = run_comparison(tiny, ["gptq"], Settings(**s), torch.device("cpu"), torch.float32)
    second = run_comparison(tiny, ["gptq"], Settings(**s), torch.device("cpu"), torch.float32)
    assert len(calls) == 1 and list((tmp_path / "quantized").glob("*.safetensors"))
    a, b = first.backend("gptq"), second.backend("gptq")
    assert [r.error["rel_isolated"] for r in a.layers] == [r.error["rel_isolated"] for r in b.layers]


def test_shared_weights_same_numbers_through_every_kernel(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBRIDGE_CACHE", str(tmp_path))
    s = Settings(**FAST, calib_samples=8, calib_len=64, weights="gptq", skip_unavailable=True)
    comp = run_comparison(tiny, ["gptq", "native", "bnb-nf4"], s, torch.device("cpu"), torch.float32)
    gptq, native, bnb = comp.backend("gptq"), comp.backend("native"), comp.backend("bnb-nf4")
    assert gptq.weights == native.weights == "gptq (shared)"
    assert bnb.status == "unavailable" and "cannot run gptq" in bnb.reason
    for a, b in zip(gptq.layers, native.layers):
        assert a.error["rel_isolated"] == pytest.approx(b.error["rel_isolated"], rel=1e-6, abs=1e-9)


def test_weights_from_non_canonical_backend_rejected(tiny):
    from quantbridge.plugin.errors import UserError

    with pytest.raises(UserError, match="not canonical INT4"):
        run_comparison(tiny, ["native"], Settings(**FAST, weights="bnb-nf4"), torch.device("cpu"), torch.float32)


def test_calibration_file_errors(tiny, tmp_path):
    from quantbridge.plugin.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        calibration(tiny.tokenizer, 4, 64, str(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(UserError, match="--calib-len"):
        calibration(tiny.tokenizer, 4, 64, str(short))
    cal = calibration(tiny.tokenizer, 4, 64)
    assert isinstance(cal, Calibration) and cal.input_ids.shape == (4, 64) and len(cal.digest) == 16
    assert isinstance(Int4Weight, type)


@pytest.mark.parametrize("backend", ["gptq", "awq"])
def test_calibration_reports_its_layer_groups(tiny, backend):
    """A calibration is a bar per decoder layer (llm-compressor's sequential stages), not one
    opaque step: the CLI shows how far it is and its ETA."""
    from quantbridge.run.rows import Progress

    class Recorder(Progress):
        def __init__(self):
            self.events = []

        def begin(self, description, total):
            self.events.append(("begin", description, total))

        def advance(self, n=1):
            self.events.append(("advance", n))

    rec = Recorder()
    s = Settings(**{**FAST, "batches": [1]}, calib_samples=4, calib_len=32, cache=False)
    run_comparison(tiny, [backend], s, torch.device("cpu"), torch.float32, progress=rec)
    layers = tiny.model.config.num_hidden_layers
    i = next(i for i, e in enumerate(rec.events) if e[0] == "begin" and "layer groups" in e[1])
    assert rec.events[i][1].startswith(f"{backend}: calibrate + quantize (4x32 tokens): layer groups of")
    groups = rec.events[i][2]
    assert groups >= layers  # one stage per decoder layer (plus the head, where it is a stage)
    after = rec.events[i + 1:]
    end = next((j for j, e in enumerate(after) if e[0] == "begin"), len(after))
    assert sum(e[1] for e in after[:end] if e[0] == "advance") >= groups

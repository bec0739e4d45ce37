"""Quantizers, kernels and the chooser: reasons for every rejection, layouts exact, kernel rows."""

import json

import pytest
import torch
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.plugin import backend as registry
from quantbridge.plugin.errors import NoKernel, UserError
from quantbridge.plugin.kernel import choose, get_kernel, kernel_names, parse_kernels
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.quantizer import get_quantizer, quantizer_names
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.compare import Settings, run_comparison

CPU = torch.device("cpu")
FAST = dict(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64)


def _weight(n=48, k=256, seed=0, perm=False, group=64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    p = torch.randperm(k, generator=gen) if perm else None
    from quantbridge.plugin.packed import canonical_perm

    return canonical_perm(quantize_rtn(w, QuantSpec(group_size=group), scale_dtype=torch.float32, perm=p))


def test_registries_list_quantizers_and_kernels():
    assert {"rtn", "gptq", "awq"} <= set(quantizer_names())
    assert {"triton", "reference", "tinygemm", "gptq-layout", "awq-layout"} <= set(kernel_names())
    with pytest.raises(UserError, match="unknown kernel 'nosuch'; valid kernels:"):
        parse_kernels("reference,nosuch")
    with pytest.raises(UserError, match="unknown quantizer"):
        get_quantizer("nosuch")


def test_chooser_takes_the_first_that_can_and_says_why_it_passed_over_the_others():
    w = _weight()
    c = choose(["triton", "tinygemm", "reference"], w, CPU, torch.float32)
    assert c.kernel.name == "reference"
    assert dict(c.rejected) == {"triton": "needs CUDA", "tinygemm": "torch's tinygemm kernel runs on CUDA only"}
    none = choose(["triton", "tinygemm"], w, CPU, torch.float32)
    assert none.kernel is None and "triton: needs CUDA" in none.why_not and "tinygemm:" in none.why_not


def test_can_implement_reasons_are_about_the_weight():
    act = _weight(perm=True)
    assert get_kernel("awq-layout").can_implement(act, CPU, torch.float32).reason == "AWQ's layout has no act-order (g_idx)"
    assert get_kernel("gptq-layout").can_implement(act, CPU, torch.float32).ok
    tg = get_kernel("tinygemm")
    assert "bf16 activations only" in tg.can_implement(_weight(), CPU, torch.float32).reason
    per_channel = quantize_rtn(torch.randn(8, 512), QuantSpec(group_size=-1), scale_dtype=torch.bfloat16)
    assert "group size 512 not in (32, 64, 128, 256)" in tg.can_implement(per_channel, CPU, torch.bfloat16).reason
    odd_k = quantize_rtn(torch.randn(8, 192), QuantSpec(group_size=64), scale_dtype=torch.bfloat16)
    assert "not divisible by 128" in tg.can_implement(odd_k, CPU, torch.bfloat16).reason


@pytest.mark.parametrize("name", ["reference", "gptq-layout", "awq-layout"])
def test_every_cpu_kernel_layout_holds_the_canonical_weight(name):
    """The layer's own dequantization is the canonical weight, and its output matches float64."""
    w = _weight(seed=3)
    layer = get_kernel(name).build(w, None)
    assert torch.equal(layer.dequantize(), w.dequantize(torch.float32))
    x = torch.randn(5, w.in_features, generator=torch.Generator().manual_seed(4))
    ref = x.double() @ w.dequantize(torch.float64).T
    assert ((layer(x).double() - ref).norm() / ref.norm()).item() < 1e-5  # fp32 arithmetic


def test_backend_records_what_the_chooser_passed_over():
    layer = registry.get("native").from_int4(_weight(), None)
    assert layer.kernel == "reference-torch" and dict(layer.rejected_kernels) == {"triton": "needs CUDA"}
    with pytest.raises(NoKernel, match="no kernel of tinygemm can run this weight: tinygemm:"):  # a UserError
        registry.get("tinygemm").from_int4(_weight(), None)


def test_kernel_rows_run_one_quantizers_weights_through_each_kernel(tiny):
    s = Settings(**FAST, weights="native", kernels=["reference", "gptq-layout", "awq-layout", "tinygemm"],
                 skip_unavailable=True)
    comp = run_comparison(tiny, ["native"], s, CPU, torch.float32)
    rows = {b.name: b for b in comp.backends}
    assert list(rows) == ["fp16", "native", "native+reference", "native+gptq-layout", "native+awq-layout",
                          "native+tinygemm"]
    ok = [rows[n] for n in ("native+reference", "native+gptq-layout", "native+awq-layout")]
    for b in ok:
        assert b.status == "ok" and b.weights == "native (shared)", b.reason
    # the same weights: the kernels agree to fp32 rounding on every layer
    for layers in zip(*(b.layers for b in ok)):
        errs = [r.error["rel_isolated"] for r in layers]
        assert max(errs) - min(errs) < 1e-5, layers[0].name
    assert rows["native+tinygemm"].status == "unavailable" and "CUDA" in rows["native+tinygemm"].reason
    native = comp.backend("native")
    assert native.model_metrics["kernels_passed_over"] == {"triton": "needs CUDA"}


def test_kernel_rows_need_shared_weights(tiny):
    with pytest.raises(UserError, match="--kernels runs one set of weights through several kernels"):
        run_comparison(tiny, [], Settings(**FAST, kernels=["reference"]), CPU, torch.float32)


def test_env_json_lists_quantizers_and_kernels_with_reasons():
    r = CliRunner().invoke(cli, ["env", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    kernels = {k["kernel"]: k for k in d["kernels"]}
    assert kernels["reference"]["available"]
    if not torch.cuda.is_available():
        assert not kernels["triton"]["available"] and kernels["triton"]["reason"] == "needs CUDA"
    native = next(b for b in d["backends"] if b["backend"] == "native")
    assert native["quantizer"] == "rtn" and native["kernels"] == ["triton", "reference"]
    assert {q["quantizer"] for q in d["quantizers"]} >= {"rtn", "gptq", "awq"}


def test_kernel_rows_in_child_processes_match_in_process(tiny):
    s = Settings(**FAST, weights="native", kernels=["gptq-layout"])
    here = run_comparison(tiny, [], s, CPU, torch.float32)
    there = run_comparison(tiny, [], s, CPU, torch.float32, isolation="process")
    assert [b.name for b in there.backends] == ["fp16", "native+gptq-layout"]
    a, b = here.backend("native+gptq-layout"), there.backend("native+gptq-layout")
    assert b.status == "ok", b.reason
    assert [r.error["rel_isolated"] for r in a.layers] == [r.error["rel_isolated"] for r in b.layers]


def test_plan_leaves_kernel_rows_out(tiny):
    from quantbridge.results.plan import Budget, make_plan

    s = Settings(**FAST, weights="native", kernels=["gptq-layout"], sensitivity=True)
    comp = run_comparison(tiny, ["native"], s, CPU, torch.float32)
    assert comp.backend("native+gptq-layout").model_metrics["only_kernel"] == "gptq-layout"
    plan = make_plan(comp, Budget(max_ppl_increase_pct=100.0), 1)
    assert set(plan["layers"].values()) <= {"fp16", "native"}  # compare --plan can build these by name


def test_native_layer_runs_the_kernel_the_one_chooser_built_it_for():
    w = _weight(seed=5)  # on the CPU: the Triton kernel cannot run it, the chooser says why and takes the reference
    layer = registry.get("native").from_int4(w, None)
    assert layer.kernel == "reference-torch" and [k for k, _ in layer.rejected_kernels] == ["triton"]
    assert layer.to("cpu").kernel == "reference-torch"  # a move keeps the kernel it was built for
    assert get_kernel("reference").build(w, None).kernel == "reference-torch"


def test_a_kernel_named_for_a_dtype_it_never_takes_is_refused_before_any_work(monkeypatch, tmp_path):
    """Declared activation dtypes: the kernel's own check and the commands' refusal say the same,
    with the --dtype to pass; a kernel that cannot run here at all is left to its row."""
    from quantbridge.plugin.availability import Availability
    from quantbridge.plugin.kernel import refuse_dtype

    tg = get_kernel("tinygemm")
    assert tg.dtype_check(torch.float16).reason == "bf16 activations only, not float16 (use --dtype bf16)"
    assert get_kernel("gemlite").dtype_check(torch.float32).reason.endswith("(use --dtype fp16 or bf16)")
    assert get_kernel("reference").dtype_check(torch.float64).ok
    refuse_dtype(["tinygemm"], torch.float16, CPU)  # not runnable on a CPU: its row will say so
    monkeypatch.setattr(type(tg), "available", lambda self, device: Availability(True, "here"))
    with pytest.raises(UserError, match=r"--kernels tinygemm: bf16 activations only, not float16 \(use --dtype bf16\)"):
        refuse_dtype(["reference", "tinygemm"], torch.float16, CPU)
    r = CliRunner().invoke(cli, ["bench", "--quick", "--dtype", "fp16", "--kernels", "tinygemm", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--kernels tinygemm: bf16 activations only" in r.output
    assert not (tmp_path / "b").exists()  # refused before anything was created

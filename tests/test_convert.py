"""quantbridge convert and quantized checkpoints: written, read back, bit-identical, same outputs."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantbridge.cli import cli
from quantbridge.models.checkpoint import load_quantized, read_int4
from quantbridge.models.load import linear_layers
from quantbridge.plugin import backend as registry
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.compare import Settings, run_comparison
from quantbridge.run.convert import convert


@pytest.fixture(scope="module")
def rtn_gptq(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "gptq"
    convert("tiny", "gptq", out, method="native")
    return out


def test_checkpoint_chain_is_bit_identical(rtn_gptq, tmp_path):
    """GPTQ -> AWQ -> native -> compressed-tensors -> GPTQ: every tensor of the file identical."""
    src = rtn_gptq
    for fmt in ("awq", "native", "compressed-tensors", "gptq"):
        nxt = tmp_path / fmt
        convert(str(src), fmt, nxt)
        assert json.loads((nxt / "config.json").read_text())["quantization_config"]
        src = nxt
    a, b = load_file(str(rtn_gptq / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_checkpoint_files_get_the_umasks_mode(rtn_gptq):
    """Every file convert writes has the mode the umask gives (a server running as another user reads it)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in rtn_gptq.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes


def test_checkpoint_holds_the_quantized_weights(rtn_gptq, tiny):
    """What convert wrote decodes to exactly the RTN weights of the float model."""
    _, qcfg, weights, _ = read_int4(rtn_gptq)
    # asymmetric (the default): gptq_v2, what GPTQModel loads (formats/gptq.py)
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == qcfg["format"] == "gptq_v2"
    lins = linear_layers(tiny.model)
    assert set(weights) == set(lins) - {"lm_head"}
    spec = QuantSpec()
    for n, w in weights.items():
        ref = quantize_rtn(lins[n].weight.detach(), spec, scale_dtype=torch.float32)
        assert torch.equal(w.qweight, ref.qweight) and torch.equal(w.zeros, ref.zeros) and torch.equal(w.scales, ref.scales)


def test_converted_checkpoints_give_identical_layer_outputs(rtn_gptq, tmp_path, tiny):
    convert(str(rtn_gptq), "compressed-tensors", tmp_path / "ct")
    a = load_quantized(rtn_gptq, torch.device("cpu"), torch.float32)
    b = load_quantized(tmp_path / "ct", torch.device("cpu"), torch.float32)
    native = registry.get("native")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    for n in a.int4:
        la, lb = native.from_int4(a.int4[n], None), native.from_int4(b.int4[n], None)
        xin = torch.randn(3, la.in_features, generator=torch.Generator().manual_seed(5)) if la.in_features != 256 else x
        assert torch.equal(la(xin), lb(xin)), n
    # the float parts of the model are the original ones
    ids = torch.arange(10, 42).unsqueeze(0)
    torch.testing.assert_close(a.model.model.embed_tokens(ids), tiny.model.model.embed_tokens(ids), rtol=0, atol=0)


def test_compare_on_a_checkpoint_runs_its_weights_through_every_kernel(rtn_gptq):
    loaded = load_quantized(rtn_gptq, torch.device("cpu"), torch.float32)
    s = Settings(batches=[1], prefill=0, runs=5, warmup=1, eval_seqs=1, eval_len=64,
                 skip_unavailable=True)  # bnb-nf4 cannot run a checkpoint's weights: recorded, not a stop
    comp = run_comparison(loaded, ["native", "gptq", "awq", "bnb-nf4"], s, torch.device("cpu"), torch.float32)
    for name in ("native", "gptq", "awq"):
        b = comp.backend(name)
        assert b.status == "ok" and b.weights == "checkpoint (gptq)", (name, b.reason)
        # the reference is the dequantized checkpoint: only kernel arithmetic differs (fp32 here)
        assert max(r.error["rel_isolated"] for r in b.layers) < 1e-6
    assert comp.backend("bnb-nf4").status == "unavailable"


def test_convert_errors(rtn_gptq, tmp_path):
    with pytest.raises(UserError, match="not empty"):
        convert(str(rtn_gptq), "awq", rtn_gptq)
    with pytest.raises(UserError, match="unknown format"):
        convert(str(rtn_gptq), "gguf", tmp_path / "x")
    with pytest.raises(UserError, match="does not quantize"):
        convert("tiny", "gptq", tmp_path / "y", method="fp16")
    act = tmp_path / "act"
    w = quantize_rtn(torch.randn(8, 64), QuantSpec(group_size=32), perm=torch.randperm(64))
    from quantbridge import formats

    with pytest.raises(ValueError, match="act-order"):
        formats.get("awq").encode(w)
    assert not act.exists()


def test_cli_convert(tmp_path):
    r = CliRunner().invoke(cli, ["convert", "tiny", "--to", "awq", str(tmp_path / "a"), "--group-size", "64"])
    assert r.exit_code == 0, r.output
    assert "28 layers as awq" in r.output
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg == {**cfg, "quant_method": "awq", "group_size": 64, "version": "gemm"}
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "nope"), "--to", "awq", str(tmp_path / "b")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(cli, ["convert", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_convert_calibrated_methods_load_back(method, tmp_path, tiny):
    pytest.importorskip("llmcompressor")
    from quantbridge.models.text import calibration

    out = tmp_path / method
    convert("tiny", method, out, method=method, calib=calibration(tiny.tokenizer, 8, 64))
    loaded = load_quantized(out, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 4096, (1, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = tiny.model(input_ids=ids).logits.double()
        got = loaded.model(input_ids=ids).logits.double()
    rel = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()
    assert 1e-3 < rel < 0.3  # quantized, close to the float model: AWQ's folding kept the function
    norm = loaded.model.model.layers[0].input_layernorm.weight
    folded = not torch.equal(norm, tiny.model.model.layers[0].input_layernorm.weight)
    assert folded == (method == "awq")


def test_auto_gptq_sidecar_config_is_read(rtn_gptq, tmp_path):
    """auto-gptq checkpoints carry quantize_config.json and no quantization_config in config.json."""
    import shutil

    old = tmp_path / "old-style"
    shutil.copytree(rtn_gptq, old)
    cfg = json.loads((old / "config.json").read_text())
    q = cfg.pop("quantization_config")
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "quantize_config.json").write_text(json.dumps({k: v for k, v in q.items() if k != "quant_method"}))
    a, b = read_int4(rtn_gptq)[2], read_int4(old)[2]
    assert a.keys() == b.keys() and all(torch.equal(a[n].qweight, b[n].qweight) for n in a)

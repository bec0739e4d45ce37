"""What `convert` writes, opened by the library that consumes each layout, through that library's
own loader: GPTQModel for `--to gptq` (v1 symmetric, gptq_v2 asymmetric, with and without
act-order) and `--to awq`; compressed-tensors (through transformers) for `--to compressed-tensors`.

Each library's dequantized weights must equal quantbridge's own dequantization bit for bit, and
GPTQModel's layer outputs on random inputs must match the float64 product of those weights.
Also: what each checkpoint declares, what no current reader opens is refused, and an
llm-compressor checkpoint round-trips through --to gptq byte for byte. Skipped, with the
reason, where a library is not installed.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from quantbridge import formats
from quantbridge.models.checkpoint import load_quantized, read_int4, save_quantized
from quantbridge.models.load import linear_layers
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, canonical_perm, quantize_rtn
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.convert import convert

HELPER = Path(__file__).resolve().parent / "gptqmodel_load.py"
LAYERS = 28  # tiny: 4 decoder layers x 7 linears (lm_head is kept in float)

# name: (--to, symmetric, act-order, the quantization_config it must declare)
GPTQMODEL_CASES = {
    "gptq-asym": ("gptq", False, False, {"checkpoint_format": "gptq_v2", "format": "gptq_v2", "sym": False}),
    "gptq-sym": ("gptq", True, False, {"checkpoint_format": "gptq", "format": "gptq", "sym": True}),
    "gptq-asym-act": ("gptq", False, True, {"checkpoint_format": "gptq_v2", "desc_act": True, "sym": False}),
    "gptq-sym-act": ("gptq", True, True, {"checkpoint_format": "gptq", "desc_act": True, "sym": True}),
    "awq-asym": ("awq", False, False, {"version": "gemm", "zero_point": True}),
    "awq-sym": ("awq", True, False, {"version": "gemm", "zero_point": False}),
}
CT_CASES = {"ct-asym": False, "ct-sym": True}


def _act_order_source(tiny, out: Path, symmetric: bool) -> Path:
    """A native checkpoint whose weights carry a real act-order permutation (RTN keeps none)."""
    gen = torch.Generator().manual_seed(11 + symmetric)
    spec = QuantSpec(symmetric=symmetric, act_order=True)
    weights = {n: canonical_perm(quantize_rtn(m.weight.detach(), spec, scale_dtype=torch.float32,
                                              perm=torch.randperm(m.in_features, generator=gen)))
               for n, m in linear_layers(tiny.model).items() if n != "lm_head"}
    return save_quantized(out, tiny.model, tiny.tokenizer, weights, formats.get("native"), spec)


def _write(name: str, to: str, symmetric: bool, act_order: bool, root: Path, tiny) -> Path:
    out = root / name
    if act_order:
        src = _act_order_source(tiny, root / f"{name}-src", symmetric)
        convert(str(src), to, out)
    else:
        convert("tiny", to, out, spec=QuantSpec(symmetric=symmetric))
    return out


def _with_scales(w: Int4Weight, dtype: torch.dtype) -> Int4Weight:
    """The weight as a library holds it after loading in `dtype` (scales cast, codes as stored)."""
    return Int4Weight(w.qweight, w.scales.to(dtype), w.zeros, w.group_size, w.perm)


# -- GPTQModel: --to gptq and --to awq -------------------------------------------------------------


@pytest.fixture(scope="module")
def gptqmodel_opened(tmp_path_factory, tiny):
    """Every GPTQModel case written by convert, then opened by GPTQModel.load in one subprocess."""
    if find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed (quantbridge env prints the command)")
    root = tmp_path_factory.mktemp("gptqmodel")
    paths = {name: _write(name, to, sym, act, root, tiny) for name, (to, sym, act, _) in GPTQMODEL_CASES.items()}
    out = root / "opened.pt"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    r = subprocess.run([sys.executable, str(HELPER), str(out), "20", *map(str, paths.values())], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    opened = torch.load(out, weights_only=False)
    return paths, {name: opened["checkpoints"][str(p)] for name, p in paths.items()}


@pytest.mark.parametrize("name", list(GPTQMODEL_CASES))
def test_gptqmodel_opens_what_convert_writes(gptqmodel_opened, name):
    paths, opened = gptqmodel_opened
    to, _, act_order, declared = GPTQMODEL_CASES[name]
    got = opened[name]
    assert "error" not in got, got.get("error")  # v1 asymmetric: "Loading of a sym=False model with format=gptq ..."
    qcfg = json.loads((paths[name] / "config.json").read_text())["quantization_config"]
    assert qcfg == {**qcfg, **declared}
    _, _, weights, _ = read_int4(paths[name])
    assert len(weights) == LAYERS and set(got["layers"]) == set(weights)
    assert any(w.perm is not None for w in weights.values()) == act_order
    for n, w in weights.items():
        layer = got["layers"][n]
        assert layer["kernel"] == ("AwqTorchLinear" if to == "awq" else "TorchLinear")
        held = _with_scales(w, torch.float16)
        # (q - z) * s: an integer of at most 4 bits times an fp16 scale is exact in fp32, so
        # quantbridge's fp32 arithmetic rounded to fp16 is GPTQModel's one fp16 product, bit for bit.
        assert torch.equal(layer["weight"], held.dequantize(torch.float16)), n
        want = layer["x"].double() @ held.dequantize(torch.float64).t()
        rel = ((layer["y"].double() - want).norm() / want.norm()).item()
        assert layer["y"].dtype == torch.float16 and rel < 2e-3, (n, rel)  # fp16 output rounding (2^-11) and sums


# -- compressed-tensors: --to compressed-tensors ---------------------------------------------------


@pytest.mark.parametrize("name", list(CT_CASES))
def test_compressed_tensors_opens_what_convert_writes(name, tmp_path, tiny):
    if find_spec("compressed_tensors") is None:
        pytest.skip("compressed-tensors is not installed (pip install 'quantbridge[test]')")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    path = _write(name, "compressed-tensors", CT_CASES[name], False, tmp_path, tiny)
    # transformers hands the checkpoint to compressed-tensors' ModelCompressor, which decompresses it
    lib = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(run_compressed=False))
    _, _, weights, _ = read_int4(path)
    mods = dict(lib.named_modules())
    assert len(weights) == LAYERS
    for n, w in weights.items():
        assert torch.equal(mods[n].weight.detach(), w.dequantize(torch.float32)), n
    ours = load_quantized(path, torch.device("cpu"), torch.float32).model
    ids = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        want, got = ours(input_ids=ids).logits.double(), lib(input_ids=ids).logits.double()
    # same weights and float parts, both in float32: only the order of float32 sums may differ
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_act_order_is_not_written_as_compressed_tensors(tmp_path, tiny):
    """compressed-tensors 0.19 and vLLM 0.32 refuse actorder 'group' (g_idx): refused, nothing written."""
    src = _act_order_source(tiny, tmp_path / "act", symmetric=False)
    with pytest.raises(UserError, match="no longer hold act-order"):
        convert(str(src), "compressed-tensors", tmp_path / "ct")
    with pytest.raises(UserError, match="no longer hold act-order"):  # asked for: refused before any work
        convert("tiny", "compressed-tensors", tmp_path / "ct2", spec=QuantSpec(act_order=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["act"]


def test_cli_names_the_variant_and_refuses_act_order_compressed_tensors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import quantbridge.run.convert
    from quantbridge.cli import cli

    for flag, variant in (("--asymmetric", "gptq (v2)"), ("--symmetric", "gptq (v1)")):
        r = CliRunner().invoke(cli, ["convert", "tiny", "--to", "gptq", str(tmp_path / flag), flag])
        assert r.exit_code == 0 and f"28 layers as {variant}," in r.output, r.output

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(quantbridge.run.convert, "load_model", refuse)
    r = CliRunner().invoke(cli, ["convert", "tiny", "--to", "compressed-tensors", str(tmp_path / "ct"), "--act-order"])
    assert r.exit_code == 2 and "no longer hold act-order" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "ct").exists()


def test_gptq_checkpoint_of_an_unread_layout_is_a_one_line_error(tmp_path, tiny):
    """checkpoint_format names what the tensors are: one quantbridge does not read is refused, not read as v1."""
    path = _write("g", "gptq", False, False, tmp_path, tiny)
    cfg = json.loads((path / "config.json").read_text())
    for fields, msg in (({"checkpoint_format": "marlin", "format": "marlin"}, "'marlin' is not supported"),
                        ({"checkpoint_format": "gptq"}, "disagree")):
        cfg["quantization_config"].update(fields)
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError, match=msg):
            read_int4(path)


def test_act_order_is_declared_only_where_the_weights_have_it(tmp_path, tiny):
    """desc_act: true with a trivial g_idx would be a false claim (and makes vLLM 0.32 refuse a
    checkpoint it can serve): RTN, which keeps no permutation, refuses --act-order outright, and
    weights that carry one are declared so."""
    with pytest.raises(UserError, match="rtn has no act-order"):
        convert("tiny", "gptq", tmp_path / "g", spec=QuantSpec(act_order=True))
    assert not (tmp_path / "g").exists()
    convert("tiny", "gptq", tmp_path / "plain")
    _, qcfg, weights, _ = read_int4(tmp_path / "plain")
    assert qcfg["desc_act"] is False and all(w.perm is None for w in weights.values())
    src = _act_order_source(tiny, tmp_path / "act", symmetric=True)
    convert(str(src), "gptq", tmp_path / "permuted")
    _, qcfg, weights, _ = read_int4(tmp_path / "permuted")
    assert qcfg["desc_act"] is True and all(w.perm is not None for w in weights.values())


def test_llm_compressor_checkpoint_round_trips_through_gptq(tmp_path, tiny):
    """compressed-tensors written by llm-compressor itself -> --to gptq (asymmetric: gptq_v2) -> back
    to compressed-tensors: the quantized tensors identical byte for byte, a zero-point of 0 included
    (which v1 cannot hold)."""
    pytest.importorskip("llmcompressor")
    import copy

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = copy.deepcopy(tiny.model)
    with torch.no_grad():  # one group of non-negative weights: its zero-point is 0
        w = model.model.layers[0].self_attn.q_proj.weight
        w[0, :128] = w[0, :128].abs() + 1e-3
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}
    oneshot(model=model, recipe=QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                                                     ignore=["lm_head"]))
    src = tmp_path / "llmc"
    model.save_pretrained(src, save_compressed=True)
    tiny.tokenizer.save_pretrained(src)
    assert int(read_int4(src)[2]["model.layers.0.self_attn.q_proj"].zeros[0, 0]) == 0
    convert(str(src), "gptq", tmp_path / "g")
    assert read_int4(tmp_path / "g")[1]["checkpoint_format"] == "gptq_v2"
    convert(str(tmp_path / "g"), "compressed-tensors", tmp_path / "back")
    from safetensors.torch import load_file

    a = {}
    for f in sorted(src.glob("*.safetensors")):
        a.update(load_file(str(f)))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    packed = [k for k in a if k.rpartition(".")[2].startswith("weight_")]
    assert len(packed) == 4 * LAYERS and a.keys() == b.keys()  # packed, scale, zero point, shape
    for k in packed:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

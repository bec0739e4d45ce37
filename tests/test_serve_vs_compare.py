"""benchmarks/serve_vs_compare.py pairs a served layer with compare's by name and kernel, per M."""

import importlib.util
import random
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_vs_compare.py"


def _module():
    spec = importlib.util.spec_from_file_location("serve_vs_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer(name: str, kernel: str, us: float) -> dict:
    return {"name": name, "kernel": kernel, "latency_us": {"1": {"median": us}}}


def test_pairs_only_layers_named_alike_with_the_same_kernel(tmp_path):
    mod = _module()
    rng = random.Random()
    o, down, qkv = (rng.uniform(5, 50) for _ in range(3))
    served = [_layer("model.layers.0.self_attn.o_proj", "quantbridge.triton", o * 1.05),
              _layer("model.layers.0.mlp.down_proj", "quantbridge.triton", down * 1.3),
              _layer("model.layers.0.self_attn.qkv_proj", "quantbridge.triton", qkv)]
    serve = {"backends": [{"name": "vllm:native", "status": "ok", "timing": "eager", "layers": []},
                          {"name": "vllm:native [graph]", "status": "ok", "timing": "graph", "layers": served}]}
    comp = {"backends": [
        {"name": "fp16", "status": "ok", "role": "reference", "layers": [_layer("x", "torch.linear", 1.0)]},
        {"name": "native", "status": "ok", "role": "measured",
         "layers": [_layer("model.layers.0.self_attn.o_proj", "quantbridge.triton", o),
                    _layer("model.layers.0.mlp.down_proj", "quantbridge.triton", down),
                    _layer("model.layers.0.self_attn.q_proj", "quantbridge.triton", qkv / 3)]}]}
    pairs, unpaired = mod.pair(serve, comp, "1")
    got = {p["layer"]: p for p in pairs}
    assert abs(got["model.layers.0.self_attn.o_proj"]["ratio"] - 1.05) < 1e-9
    assert got["model.layers.0.self_attn.o_proj"]["within"] and not got["model.layers.0.mlp.down_proj"]["within"]
    assert [n for n, _ in unpaired] == ["model.layers.0.self_attn.qkv_proj"]
    text = mod.to_markdown(pairs, unpaired, "1")
    assert "1 of 2 paired layers within 10%" in text and "qkv_proj" in text

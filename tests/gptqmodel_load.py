"""Runs in a subprocess (see tests/test_convert_readers.py): GPTQModel opens checkpoints through
its own loader, GPTQModel.load, and this writes what it then holds.

usage: python tests/gptqmodel_load.py OUT.pt SEED CHECKPOINT...

For each checkpoint and each quantized layer: the layer's class, GPTQModel's own dequantization
of its tensors ([N, K], in the load dtype fp16) and the layer's output on random inputs. A
checkpoint GPTQModel refuses is recorded with its error. A subprocess because GPTQModel.load
changes its process (HF_HOME and other environment variables, the root logger); run with
TORCHDYNAMO_DISABLE=1, so its torch.compile of the dequantization (tens of seconds per layer
shape on a CPU) runs the same code eagerly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """[N, K]: what the layer's forward multiplies by, from GPTQModel's own code."""
    if hasattr(layer, "dequantize_weight"):  # TorchLinear (GPTQ): [K, N]
        w = layer.dequantize_weight()
    else:  # AwqTorchLinear has only the helper its forward calls
        x = torch.empty(0, layer.in_features, dtype=layer.scales.dtype)
        w = layer._dequantize_weight_for_inference(x, dtype=layer.scales.dtype)
    return w.t().contiguous()


def load(path: str, gen: torch.Generator) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    awq = json.loads((Path(path) / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    try:
        model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH_AWQ if awq else BACKEND.TORCH,
                               dtype=torch.float16)
    except Exception as e:  # noqa: BLE001 - the refusal itself is the result
        return {"error": f"{type(e).__name__}: {e}"}
    layers = {}
    with torch.no_grad():
        for name, m in model.model.named_modules():
            if hasattr(m, "qweight"):
                x = torch.randn(3, m.in_features, generator=gen).to(torch.float16)
                layers[name] = {"kernel": type(m).__name__, "weight": dequantized(m), "x": x, "y": m(x)}
    return {"layers": layers}


def main(out: str, seed: str, paths: list[str]) -> None:
    from importlib.metadata import version

    gen = torch.Generator().manual_seed(int(seed))
    torch.save({"version": version("gptqmodel"), "checkpoints": {p: load(p, gen) for p in paths}}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

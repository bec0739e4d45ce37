"""`quantbridge convert`: a float model quantized by one algorithm, or an INT4 checkpoint in one
layout, written as a checkpoint in another layout. Quantized-to-quantized is lossless."""

from __future__ import annotations

from pathlib import Path

import torch

from quantbridge import formats
from quantbridge.models.checkpoint import check_out_dir, is_quantized, read_int4, save_quantized, spec_of
from quantbridge.models.gguf import is_gguf
from quantbridge.models.load import DEMO_GGUF_NAME, linear_layers, load_model
from quantbridge.plugin import backend as registry
from quantbridge.plugin import resolve
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.preflight import check_skip, skip_targets


def convert(src: str, to: str, out: str | Path, *, method: str = "native", spec: QuantSpec | None = None,
            skip: str = r"(^|\.)lm_head$", device: torch.device | None = None, dtype: torch.dtype | None = None,
            calib=None, overwrite: bool = False, calib_factory=None) -> dict:
    """Write SRC as a `to`-format checkpoint in OUT; returns a summary for the CLI."""

    codec = formats.get(to)
    out, replaced = check_out_dir(out, overwrite)  # before anything is loaded or computed
    if to == "awq" and spec is not None and spec.act_order:
        raise UserError("AWQ checkpoints cannot hold act-order (g_idx); drop --act-order or write --to gptq or native")
    if spec is not None:
        codec.for_checkpoint(spec)  # a layout that cannot hold what was asked refuses before any work
    check_skip(skip)
    device = device or torch.device("cpu")
    src_path = Path(src).expanduser()
    if src == DEMO_GGUF_NAME or is_gguf(src_path):
        # A GGUF's own codes, decoded exactly; a layout with integer zero-points refuses Q4_1/Q4_K.
        loaded = load_model(src, torch.device("cpu"), torch.float32)
        weights = {n: w.to("cpu") for n, w in loaded.int4.items()}
        for n, w in weights.items():  # each layer: a file may mix Q4_0 (integer zeros) with Q4_1/Q4_K
            try:
                codec.encode(w)
            except ValueError as e:
                raise UserError(f"cannot write {src} as {to} without changing its weights ({n}): {e}; "
                                "--to native holds them exactly") from None
        model, spec, how = loaded.model, spec_of(weights), f"decoded from {loaded.info['checkpoint']['format']}"
    elif src_path.is_dir() and (src_path / "config.json").exists() and is_quantized(src_path):
        _, _, weights, rest = read_int4(src_path)
        stored = next((t.dtype for t in rest.values() if t.is_floating_point()), torch.float16)
        loaded = load_model(str(src_path), torch.device("cpu"), stored)  # plain tensors in their stored dtype
        model, spec, how = loaded.model, spec_of(weights), f"decoded from {loaded.info['checkpoint']['format']}"
    else:
        loaded = load_model(src, device, dtype or torch.float32)
        spec = spec or QuantSpec()
        backend = registry.get(method)
        if not backend.quantized:
            raise UserError(f"--method {method} does not quantize; use native (RTN), gptq or awq")
        linears = linear_layers(loaded.model)
        lins = {n: linears[n] for n in skip_targets(linears, skip, src)}  # none left is refused
        spec = spec.fitted({n: m.in_features for n, m in lins.items()})
        resolve.require(resolve.backend(method, device, spec))
        cal = calib_factory(loaded.tokenizer) if backend.needs_calibration and calib_factory else calib
        model, weights = backend.export(loaded.model, lins, spec, cal)
        weights = {n: w.to("cpu") for n, w in weights.items()}
        model = model.to("cpu")
        how = f"quantized with {method} ({backend.weights_label})"
    codec = codec.for_checkpoint(spec)  # the variant written (GPTQ v1 or v2), named in the summary
    path = save_quantized(Path(out), model, loaded.tokenizer, weights, codec, spec, overwrite=overwrite)
    return {"out": str(path), "replaced": replaced, "format": codec.label, "layers": len(weights), "how": how, "spec": spec.to_dict(),
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}

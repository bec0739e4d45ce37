"""A GGUF file as a model to compare: its float reference and llama.cpp's own INT4 codes.

The float model is the GGUF dequantized to float32 by transformers' GGUF loader (the `gguf`
package), saved once as a Hugging Face directory in the cache (transformers will not save a
model it loaded from GGUF, so the weights are copied into a plain model of the same config).
The 4-bit tensors (Q4_0, Q4_1, Q4_K) are read again into canonical Int4Weights
(formats/gguf.py), mapped to the model's module names by transformers' own GGUF name map
and row permutation (Llama's q/k rows are stored in llama.cpp's RoPE order), and checked
to dequantize to exactly the reference's weights. The comparison then runs those codes
through every kernel, as it does a quantized checkpoint's: each row's error is its kernel's.
Other tensor types (Q8_0, Q6_K, F16, F32) stay unquantized and `info` lists them.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import torch

from quantbridge.files.cache import save_model_dir
from quantbridge.formats.gguf import Q4_TYPES, decode, open_gguf, permute_rows
from quantbridge.models.loaded import LoadedModel, linear_layers
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import cache_dir
from quantbridge.plugin.packed import cast_scales
from quantbridge.plugin.quantizer import ModelCodes


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_source(model: torch.nn.Module) -> Path | None:
    """The GGUF file a model was converted from (recorded in its config when quantbridge converted it)."""
    src = getattr(getattr(model, "config", None), "quantbridge_source", None) or {}
    path = Path(src["path"]) if src.get("path") else None
    if (path is None or not path.is_file()) and src.get("package"):  # the demo: the installed package's file
        path = _package_file(src["package"], src.get("gguf", ""))
    return path if path is not None and path.is_file() else None


def _package_file(package: str, name: str) -> Path | None:
    """The file called `name` that the installed distribution `package` holds (None when gone)."""
    try:
        files = distribution(package).files or []
    except PackageNotFoundError:
        return None
    found = [f for f in files if f.name == name]
    return Path(found[0].locate()) if found else None


def model_codes(model: torch.nn.Module) -> ModelCodes | None:
    """The Q4 codes of the GGUF file `model` came from, by module path (None: it came from none)."""
    src = gguf_source(model)
    if src is None:
        return None
    weights, kinds, others = read_int4(src, model)
    return ModelCodes(src.name, weights, kinds, others)


def to_hf_dir(src: Path, out: Path, note: dict | None = None) -> Path:
    """`src` (GGUF) as a Hugging Face directory at `out`, converted on first use (atomically)."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, NotImplementedError, IndexError, struct.error) as e:
        raise UserError(f"could not read {src} as a GGUF causal LM: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF marker that makes transformers refuse to save
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.config.quantbridge_source = {"gguf": src.name, "path": str(src.resolve()), **(note or {}),
                                       "note": "GGUF weights dequantized to float32 by the gguf package"}
    return save_model_dir(out, plain, tok)


def read_int4(src: Path, model: torch.nn.Module, reader=None) -> tuple[dict, dict[str, str], dict[str, str]]:
    """(module path -> Int4Weight for every Q4 linear, -> its GGUF type, -> GGUF type of the other linears)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = reader or open_gguf(src)
    processor = TENSOR_PROCESSORS.get(model.config.model_type, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    lins = linear_layers(model)
    weights, kinds, others = {}, {}, {}
    for t in reader.tensors:
        hf = names.get(t.name, "").removesuffix(".weight")
        if hf not in lins:
            continue
        kind = t.tensor_type.name
        if kind not in Q4_TYPES:
            others[hf] = kind
            continue
        k, n = int(t.shape[0]), int(t.shape[1])
        w = decode(kind, t.data, n, k)
        # transformers' own reordering of this tensor's rows (Llama q/k), applied to row indices
        order = processor.process(np.arange(n, dtype=np.int64).reshape(n, 1), name=t.name).weights.reshape(-1)
        if not np.array_equal(order, np.arange(n)):
            w = permute_rows(w, torch.from_numpy(np.ascontiguousarray(order)))
        weights[hf], kinds[hf] = w, kind
    for hf in lins:  # linears with no tensor of their own (a head tied to the embeddings)
        if hf not in weights and hf not in others:
            others[hf] = "tied to the embeddings" if getattr(model.config, "tie_word_embeddings", False) else "absent"
    return weights, kinds, others


def load_gguf(src: Path, device: torch.device, dtype: torch.dtype, name: str, hf_dir: Path | None = None,
              note: dict | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    reader = open_gguf(src)  # a damaged file is named before transformers' own GGUF parser meets it
    hf_dir = to_hf_dir(src, hf_dir or cache_dir() / f"gguf-{_file_key(src)}", note)
    hf_logging.disable_progress_bar()  # quantbridge shows its own progress
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    weights, kinds, others = read_int4(src, model, reader)
    if not weights:
        raise UserError(f"{src} has no Q4_0, Q4_1 or Q4_K linear layers ({Counter(others.values())}); "
                        "compare the float model instead")
    lins = linear_layers(model)
    for n, w in weights.items():
        if not torch.equal(w.dequantize(dtype), lins[n].weight.data):
            raise UserError(f"{src}: {n} read from the GGUF file does not match the loaded model's weight; "
                            "this GGUF layout is not one quantbridge maps exactly")
        weights[n] = cast_scales(w, dtype).to(device)  # scales in the compute dtype, as kernels take them
    model.to(device).eval()
    info = {"name": name, "source": str(src.resolve()), "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "hash": f"gguf-{_file_key(src)}",
            "checkpoint": {"format": "gguf", "quantized_layers": len(weights), "gguf_types": dict(Counter(kinds.values())),
                           "unquantized_layers": others},
            "note": "reference: the GGUF's weights dequantized to float32; every row runs the GGUF's own codes"}
    tok = AutoTokenizer.from_pretrained(hf_dir)
    return LoadedModel(name=name, source=info["source"], model=model, tokenizer=tok, info=info, int4=weights)


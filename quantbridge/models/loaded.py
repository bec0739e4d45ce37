"""A loaded model as the rest of quantbridge sees it, and the walk over its linear layers.

Both loaders (models.py for float models, checkpoint.py for quantized checkpoints) build
a LoadedModel; neither needs the other's module for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from quantbridge.plugin.errors import UserError


@dataclass(frozen=True)
class ModelOrigin:
    """What `models.load_model` was given, so a row's child process can load the same model again."""

    spec: str  # "demo", "tiny", a seeded name, an absolute directory (float or quantized checkpoint), or a hub id
    device: str
    dtype: str  # "float32", "bfloat16", ...


@dataclass
class LoadedModel:
    name: str
    source: str  # "demo", "tiny", "seeded", a directory, or a hub id
    model: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)
    int4: dict | None = None  # a quantized checkpoint's weights (module path -> Int4Weight)
    origin: ModelOrigin | None = None  # None: built in memory, it cannot be loaded again elsewhere


def dir_hash(path: Path) -> str:
    """Hash of config and weight file names/sizes: identifies a checkpoint without reading GBs."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's tensors: names, shapes, dtypes and a strided sample of each one's bytes.

    A child that loaded the model again checks it against the parent's, so a model changed in
    memory after loading is never silently replaced by the file's version.
    """
    import torch

    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:16]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by module path, in execution-ish (definition) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def refuse_mismatched(mismatched, directory: Path | None, model: str) -> None:
    """A one-line error for tensors whose stored shape is not the one config.json gives them.

    `mismatched`: (name, shape in the file, shape the config makes), as transformers lists them;
    the file holding each is looked up in the directory's safetensors headers.
    """

    def shape(s) -> str:
        return "x".join(map(str, tuple(s)))

    where = _files_of([m[0] for m in mismatched], directory) if directory is not None else {}
    shown = "; ".join(f"{n} is {shape(a)} in {where.get(n, 'the weights')}, {shape(b)} by config.json"
                      for n, a, b in mismatched[:3])
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    cfg = directory / "config.json" if directory is not None else f"the config.json of {model}"
    raise UserError(f"{cfg} disagrees with the weights in {len(mismatched)} tensor(s): {shown}{more}; fix "
                    f"config.json's sizes or re-save the model (save_pretrained)")


def _files_of(names: list[str], directory: Path) -> dict[str, str]:
    """name -> the safetensors file (by name) that holds it; headers only, no tensor is read."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
        out.update({n: f.name for n in names if n not in out and n in keys})
    return out

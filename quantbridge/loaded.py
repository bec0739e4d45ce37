"""A loaded model as the rest of quantbridge sees it, and the walk over its linear layers.

Both loaders (models.py for float models, checkpoint.py for quantized checkpoints) build
a LoadedModel; neither needs the other's module for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class LoadedModel:
    name: str
    source: str  # "demo", a directory, or a hub id
    model: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)
    int4: dict | None = None  # a quantized checkpoint's weights (module path -> Int4Weight)


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


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by module path, in execution-ish (definition) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


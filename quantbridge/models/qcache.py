"""On-disk cache of calibrated quantized weights, so a second compare does not re-quantize.

Keyed by everything that determines the weights: model hash, algorithm and library version,
spec, calibration digest, dtype. One safetensors file per key, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from quantbridge.files import faults
from quantbridge.plugin.packed import Int4Weight

_FIELDS = ("qweight", "scales", "zeros", "perm", "in_scale", "out_scale", "offsets")


def key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def path_for(root: Path, k: str) -> Path:
    return root / "quantized" / f"{k}.safetensors"


def load(root: Path, k: str, device: torch.device) -> dict[str, Int4Weight] | None:
    from safetensors.torch import load_file

    p = path_for(root, k)
    if not p.exists():
        return None
    flat = load_file(str(p), device=str(device))
    out: dict[str, dict] = {}
    for name, t in flat.items():
        layer, field = name.rsplit("/", 1)
        out.setdefault(layer, {})[field] = t
    return {n: Int4Weight(group_size=d["qweight"].shape[1] * 2 // d["scales"].shape[1],
                          **{f: d.get(f) for f in _FIELDS}) for n, d in out.items()}


def save(root: Path, k: str, weights: dict[str, Int4Weight]) -> Path:
    from safetensors.torch import save_file

    flat = {f"{n}/{f}": getattr(w, f).contiguous().cpu() for n, w in weights.items()
            for f in _FIELDS if getattr(w, f) is not None}
    p = path_for(root, k)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file(flat, str(tmp))
        os.replace(tmp, p)
    except BaseException as e:  # a full disk or a signal: no half-written file stays in the cache
        tmp.unlink(missing_ok=True)
        cause = faults.os_error_of(e) if isinstance(e, Exception) else None  # safetensors: "(os error 28)"
        if cause is not None:
            raise faults.WriteFailed(p, cause, "calibrated weights in quantbridge's cache") from None
        raise
    return p

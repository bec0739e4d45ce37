"""Lossless codecs between the canonical Int4Weight and the INT4 layouts checkpoints use.

GPTQ, AWQ, compressed-tensors and quantbridge's native layout all store "group-wise
INT4 with a scale and an integer zero-point"; they differ only in packing order, zero-point
offset and how act-order is recorded. Each codec maps one layer's tensors to and from
Int4Weight bit-exactly, and describes itself in a checkpoint's `quantization_config`.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.spec import QuantSpec


class Codec:
    """One checkpoint layout. Tensors are keyed by suffix ('qweight', 'scales', ...)."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # every tensor name a quantized layer may carry

    def encode(self, w: Int4Weight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, tensors: dict[str, torch.Tensor], qcfg: dict) -> Int4Weight:
        raise NotImplementedError

    def quantization_config(self, spec: QuantSpec, skipped: list[str]) -> dict:
        raise NotImplementedError

    def matches(self, qcfg: dict) -> bool:
        raise NotImplementedError

    def for_checkpoint(self, spec: QuantSpec) -> "Codec":
        """The variant of this layout that a checkpoint of `spec` is written in (most layouts have one)."""
        return self

    @property
    def label(self) -> str:
        """What the CLI says was written: the layout, and its variant where it has several."""
        return self.name

    def layer_prefixes(self, keys: list[str]) -> list[str]:
        """Module paths of the quantized layers among a checkpoint's tensor names."""
        marker = "." + self.suffixes[0]
        return sorted(k[: -len(marker)] for k in keys if k.endswith(marker))


_CODECS: dict[str, Codec] = {}
_MODULES = ("native", "gptq", "awq", "compressed_tensors")


def require_integer_zeros(w, fmt: str) -> None:
    """Every INT4 checkpoint layout stores integer zero-points: a weight with float offsets
    (GGUF Q4_1/Q4_K) cannot be written to one without changing its values."""
    if getattr(w, "offsets", None) is not None:
        raise ValueError(f"{fmt} stores integer zero-points; these weights have a float offset per group "
                         "(GGUF Q4_1/Q4_K: w = q*s + m), which it cannot hold exactly")


def register(cls: type[Codec]) -> type[Codec]:
    _CODECS[cls.name] = cls()
    return cls


def _load() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def names() -> list[str]:
    _load()
    return list(_CODECS)


def get(name: str) -> Codec:
    _load()
    try:
        return _CODECS[name]
    except KeyError:
        raise UserError(f"unknown format {name!r}; choose from: {', '.join(_CODECS)}") from None


def detect(qcfg: dict) -> Codec:
    """The codec for a checkpoint's `quantization_config`."""
    _load()
    for codec in _CODECS.values():
        if codec.matches(qcfg):
            return codec
    raise UserError(
        f"unsupported quantization_config (quant_method={qcfg.get('quant_method')!r}, "
        f"format={qcfg.get('format')!r}); quantbridge reads: {', '.join(_CODECS)} INT4 checkpoints"
    )

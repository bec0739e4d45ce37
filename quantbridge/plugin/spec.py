"""QuantSpec: what to quantize to, independent of any backend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from quantbridge.plugin.errors import UserError

AUTO_GROUP = 0  # --group-size auto: the largest of AUTO_CHOICES that divides every quantized layer
AUTO_CHOICES = (128, 64, 32)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per output channel


def parse_group_size(text: str | int) -> int:
    """'auto', 32, 64, 128 or -1 (as the CLI takes it) -> the spec's group_size.

    Only the word auto means auto: 0 is AUTO_GROUP inside QuantSpec, but `--group-size 0` is
    refused like any other size no kernel takes (0, 16, 96, -2, ...).
    """
    if str(text).strip().lower() == "auto":
        return AUTO_GROUP
    try:
        size = int(str(text).strip())
    except ValueError:
        raise UserError(f"--group-size {text!r} is not a group size; use auto, 32, 64, 128 or -1 (per-channel)") from None
    if size not in SUPPORTED_GROUP_SIZES:
        raise UserError(f"group size {size} is not supported (--group-size {text}); use auto, 32, 64, 128 or -1 "
                        f"(per-channel)")
    return size


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise UserError(f"bits={self.bits} is not supported; quantbridge compares 4-bit backends (use --bits 4)")
        if self.group_size not in (*SUPPORTED_GROUP_SIZES, AUTO_GROUP):
            raise UserError(
                f"group size {self.group_size} is not supported; use auto, 32, 64, 128 or -1 (per-channel)"
            )

    @property
    def auto(self) -> bool:
        return self.group_size == AUTO_GROUP

    def fitted(self, layers: Mapping[str, int]) -> "QuantSpec":
        """This spec for these layers (name -> in_features): auto becomes the largest of 128/64/32
        that divides every one; an explicit group size is checked against each."""
        if self.auto:
            for g in AUTO_CHOICES:
                if all(k % g == 0 for k in layers.values()):
                    spec = replace(self, group_size=g)
                    break
            else:
                name, k = next((n, k) for n, k in layers.items() if k % AUTO_CHOICES[-1])
                raise UserError(f"no group size of 128, 64 or 32 divides every quantized layer ({name} has "
                                f"in_features={k}); pass --group-size -1 (per-channel) or --skip such layers")
        else:
            spec = self
        for n, k in layers.items():
            spec.check_layer(n, k, layers)
        return spec

    def group_for(self, in_features: int) -> int:
        """The group length along K for a layer with `in_features` inputs."""
        if self.auto:
            raise ValueError("group size auto is resolved against the layers first (QuantSpec.fitted)")
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int, layers: Mapping[str, int] | None = None) -> None:
        g = self.group_for(in_features)
        if in_features % g:
            ks = (layers or {name: in_features}).values()
            fits = [str(c) for c in AUTO_CHOICES if all(k % c == 0 for k in ks)]
            which = f"--group-size {' or '.join(fits)} (dividing every quantized layer), auto" if fits else "auto"
            raise UserError(
                f"group size {g} does not divide in_features={in_features} of layer {name}; "
                f"use {which} or -1 (per-channel)"
            )
        if in_features % 2:
            raise UserError(f"layer {name} has odd in_features={in_features}; INT4 packing needs an even K")

    def to_dict(self) -> dict:
        return asdict(self)

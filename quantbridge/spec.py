"""QuantSpec: what to quantize to, independent of any backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per output channel


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise UserError(f"bits={self.bits} is not supported; quantbridge compares 4-bit backends (use --bits 4)")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise UserError(
                f"group size {self.group_size} is not supported; use one of 32, 64, 128 or -1 (per-channel)"
            )

    def group_for(self, in_features: int) -> int:
        """The group length along K for a layer with `in_features` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int) -> None:
        g = self.group_for(in_features)
        if in_features % g:
            raise UserError(
                f"group size {g} does not divide in_features={in_features} of layer {name}; "
                f"use --group-size with a divisor of {in_features} or -1 (per-channel)"
            )
        if in_features % 2:
            raise UserError(f"layer {name} has odd in_features={in_features}; INT4 packing needs an even K")

    def to_dict(self) -> dict:
        return asdict(self)

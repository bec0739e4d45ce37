"""Reference INT4 matmul in plain torch: unpack -> dequantize -> matmul.

It runs on any device torch runs on and is the ground truth the fast kernels are tested
against. It is not fast: it materialises the full-precision weight on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantbridge.plugin.packed import Int4Weight

KERNEL_NAME = "reference-torch"


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for W given as an Int4Weight; x is [..., K] in the compute dtype."""
    if weight.perm is not None:
        x = x.index_select(-1, weight.perm)
    w = weight.dequantize_stored(x.dtype)
    return F.linear(x, w, bias)

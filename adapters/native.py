"""native: quantbridge's packed INT4 (canonical Int4Weight, round-to-nearest quantization).

Two kernels hold this layout: `triton` (CUDA, fp16/bf16 activations) and `reference` (the torch
reference, anywhere). The chooser takes the first that can run a weight (plugin/kernel.py);
`kernel` says which one the layer runs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from quantbridge.kernels import int4_reference
from quantbridge.kernels.int4_layouts import relayout
from quantbridge.plugin.availability import Availability, pip_extra
from quantbridge.plugin.backend import Pairing, register
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight


def _triton():
    try:
        from quantbridge.kernels import int4_triton
    except ImportError:
        return None
    return int4_triton


class NativeLinear(QuantLinear):
    """quantbridge's packed INT4, run by `impl` (the Triton kernel's module or the reference's).

    The codes are stored once, in the layout the bound kernel reads (`layout`, int4_layouts: the
    Triton kernel's operand layout on CUDA where it fits, canonical elsewhere); `packed`,
    `dequantize()` and the state dict give canonical codes whatever the layout."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, impl=int4_reference) -> None:
        super().__init__(weight.in_features, weight.out_features)
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("perm", weight.perm)
        self.register_buffer("offsets", weight.offsets)  # float offsets per group (GGUF Q4_1/Q4_K)
        self.group_size = weight.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._impl = impl
        self.kernel = self._impl.KERNEL_NAME
        self._retired: list = []
        self.layout = "canonical"  # how self.qweight is laid out now
        self._bind()

    def _binds(self) -> bool:
        return getattr(self._impl, "BoundLinear", None) is not None and self.qweight.is_cuda

    def _bind(self) -> None:
        """Resolve the Triton launch once (per M, on first use) instead of on every call, with the
        codes re-laid into the layout it reads (back to canonical where nothing is bound)."""
        binds = self._binds()
        want = self._impl.bound_layout(self._stored()) if binds else "canonical"
        if want != self.layout:
            self.qweight = relayout(self.qweight, self.layout, want)  # the old copy goes with its last user
            self.layout = want
        self._bound = self._impl.BoundLinear(self._stored(), self.bias, layout=self.layout) if binds else None
        self._bound_to = self._tensor_key()

    def _tensor_key(self) -> tuple:
        return tuple((t.data_ptr(), t.dtype, t.device) if t is not None else None
                     for t in (self.qweight, self.scales, self.zeros, self.perm, self.offsets, self.bias))

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() may replace the buffers, which the bound launch holds. Rebind
        # only when they really changed: a CUDA graph captured earlier holds the bound
        # launch's split-K counters, and a no-op .to() must not free them. The kernel stays
        # the one the chooser built the layer for (parking a model on the CPU and back keeps it).
        out = super()._apply(fn, *args, **kwargs)
        if self._tensor_key() != self._bound_to:
            self._retired.append(self._bound)  # graphs captured with it may still replay
            self._bind()
        return out

    def _stored(self) -> Int4Weight:
        """The weight as stored: codes in self.layout."""
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.perm, offsets=self.offsets)

    @property
    def packed(self) -> Int4Weight:
        """The weight with canonical codes (a conversion where they are stored re-laid)."""
        w = self._stored()
        return w if self.layout == "canonical" else replace(w, qweight=relayout(self.qweight, self.layout, "canonical"))

    @property
    def weight_nbytes(self) -> int:
        # the stored weight: what one call reads (bench's bandwidth figures divide by it); a binding's
        # derived copies (packed scales) show in the measured device memory instead
        return self._stored().nbytes

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "canonical":
            # A state dict holds canonical codes, whatever the kernel reads; built in host memory, so
            # saving a model does not hold a second copy of every layer's codes on the GPU.
            destination[prefix + "qweight"] = relayout(self.qweight.cpu(), self.layout, "canonical")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "qweight"
        if self.layout != "canonical" and key in state_dict and state_dict[key].shape == self.qweight.shape:
            # (another shape: torch's own size-mismatch error, unchanged)
            q = state_dict[key].to(self.qweight.device)
            state_dict = {**state_dict, key: relayout(q, "canonical", self.layout)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._bound is not None:  # loaded in place: the buffers' addresses, so no rebind, but new values
            self._bound.weights_changed()

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = self._bound
        if bound is not None:
            return bound(x)
        return self._impl.int4_linear(x, self.packed, self.bias)  # unbound: canonical codes, no conversion


@register_kernel
class TritonKernel(Kernel):
    name = "triton"
    activation_dtypes = (torch.float16, torch.bfloat16)
    layouts = ("native", "gguf")
    description = ("quantbridge's packed-INT4 Triton kernel (GEMV for decode, tensor-core tiles, warp-specialized "
                   "Hopper tiles in Gluon, dequantize+cuBLAS)")
    takes_offsets = True  # w = q * s + m is one more term per tile (GGUF Q4_1/Q4_K)

    def available(self, device: torch.device) -> Availability:
        if device.type != "cuda":
            return Availability(False, "needs CUDA")
        mod = _triton()
        if mod is None:
            return Availability(False, f"Triton is not installed: {pip_extra('triton')}")
        import triton

        from quantbridge.kernels import int4_configs

        # the tiles that make M >= 64 fast on an H100: say whether this machine gets them
        ws = "with" if int4_configs.ws_module() is not None else "without (they need an sm_90 GPU and Gluon)"
        return Availability(True, f"triton {triton.__version__}, {ws} the warp-specialized Hopper tiles")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if not (ok := self.dtype_check(dtype)).ok:
            return ok
        if weight.scales.dtype != dtype:
            return Availability(False, "scales must be in the activation dtype")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        from quantbridge.kernels import int4_triton  # Triton is optional: an ImportError passes the weight on

        return NativeLinear(weight, bias, int4_triton)


@register_kernel
class ReferenceKernel(Kernel):
    name = "reference"
    layouts = ("native", "gguf")
    description = "torch reference: unpack, dequantize, matmul (any device and dtype; the ground truth)"
    takes_offsets = True

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return NativeLinear(weight, bias, int4_reference)


@register
class NativeBackend(Pairing):
    name = "native"
    description = "quantbridge RTN weights through quantbridge's Triton kernel (the torch reference elsewhere)"
    quantizer = "rtn"


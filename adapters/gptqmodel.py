"""gptqmodel: GPTQModel's torch kernels, `TorchLinear` (GPTQ) and `AwqTorchLinear` (AWQ).

GPTQModel 7.7's torch layers run on every device (CPU included): they dequantize the
packed tensors and multiply in the activation dtype (fp16/bf16, as the library declares).
The GPTQ layer is fed GPTQ v2 tensors (the zero-point itself, which the layer requires;
v1's zero-point - 1 would need its carry-prone conversion), the AWQ layer AWQ GEMM tensors,
both from quantbridge's lossless codecs. Whether a weight fits is GPTQModel's own
`validate` (group size, act-order, dtype, shape divisibility).

GPTQModel 7.7.0 declares torch>=2.14.1 and transformers>=5.20.2 but imports and runs with
torch 2.13 and transformers 5.17; installing it with its dependencies would replace torch,
so it is installed with `--no-deps` plus the few packages its import needs (INSTALL_HINT).
Importing it prints a banner and sets allocator environment variables: both are kept out of
quantbridge's process. On CUDA `post_init` compiles its dequantization with torch.compile,
as the library does by default; on the CPU that compile step (tens of seconds per layer
shape) is skipped and `kernel` says so.
"""

from __future__ import annotations

import contextlib
import io
import os
from importlib.util import find_spec

import torch

from quantbridge.formats.awq import AWQCodec
from quantbridge.formats.gptq import GPTQCodec
from quantbridge.plugin.availability import Availability, dist_version
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

INSTALL_HINT = ("pip install --no-deps gptqmodel==7.7.0 pypcre==0.6.4 logbar==0.4.15 tokenicer==0.0.14 "
                "device-smi==0.5.7 defuser==0.0.28 threadpoolctl")
WHY_NO_DEPS = "installed with --no-deps: its declared torch>=2.14.1 would replace torch"
DTYPES = (torch.float16, torch.bfloat16)  # what both torch layers declare (SUPPORTS_DTYPES)
_ENV_SET_ON_IMPORT = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")


def _version() -> str | None:
    return dist_version("gptqmodel")


def import_layers():
    """(TorchLinear, AwqTorchLinear), imported quietly and without changing this process's environment."""
    saved = {k: os.environ.get(k) for k in _ENV_SET_ON_IMPORT}
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear
            from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return TorchLinear, AwqTorchLinear


class GPTQModelLinear(QuantLinear):
    """One of GPTQModel's torch layers holding a canonical weight in that layer's layout."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, awq: bool) -> None:
        torch_linear, awq_linear = import_layers()
        super().__init__(weight.in_features, weight.out_features)
        cls = awq_linear if awq else torch_linear
        dev, dtype = weight.qweight.device, weight.scales.dtype
        layer = cls(bits=4, group_size=weight.group_size, sym=False, desc_act=weight.perm is not None,
                    in_features=weight.in_features, out_features=weight.out_features, bias=bias is not None,
                    pack_dtype=torch.int32, register_buffers=True)
        t = AWQCodec().encode(weight) if awq else GPTQCodec("gptq_v2").encode(weight)
        with torch.no_grad():
            layer.qweight.copy_(t["qweight"].cpu())
            layer.qzeros.copy_(t["qzeros"].cpu())
            layer.scales.copy_(t["scales"].cpu().to(layer.scales.dtype))
            if not awq:
                layer.g_idx.copy_(t["g_idx"].cpu().to(layer.g_idx.dtype))
            if bias is not None:
                layer.bias.copy_(bias.detach().cpu().to(layer.bias.dtype))
        if not awq:
            layer.qzero_format(format=2)  # the tensors hold v2 zero-points already
        layer = layer.to(dev)
        if dev.type != "cuda":
            layer.optimized = True  # skip post_init's torch.compile of the dequantization (see module doc)
        layer.post_init()
        self.layer = layer.eval()
        self.compute_dtype = dtype
        self.group_size = weight.group_size
        how = "" if dev.type == "cuda" else ", eager: its torch.compile step skipped on CPU"
        self.kernel = f"gptqmodel {_version()} {cls.__name__}{how}"

    @property
    def weight_nbytes(self) -> int:
        ts = [self.layer.qweight, self.layer.qzeros, self.layer.scales] + (
            [self.layer.g_idx] if getattr(self.layer, "g_idx", None) is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def dequantize(self) -> torch.Tensor:
        """GPTQModel's own dequantization of its tensors ([N, K]): what its forward multiplies by."""
        with torch.no_grad():
            if hasattr(self.layer, "dequantize_weight"):
                w = self.layer.dequantize_weight()
            else:  # AwqTorchLinear has only the helper its forward calls
                x = torch.empty(0, self.in_features, dtype=self.compute_dtype, device=self.layer.qweight.device)
                w = self.layer._dequantize_weight_for_inference(x, dtype=self.compute_dtype)
        return w.float().t().contiguous().cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _GPTQModelKernel(Kernel):
    activation_dtypes = DTYPES
    awq: bool = False
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        v = _version()
        if v is None or find_spec("gptqmodel") is None:
            return Availability(False, f"gptqmodel is not installed ({WHY_NO_DEPS})")
        return Availability(True, f"gptqmodel {v}")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if self.awq and weight.perm is not None:
            return Availability(False, "AWQ's layout has no act-order (g_idx)")
        if not (ok := self.dtype_check(dtype)).ok:  # known without importing the library (seconds)
            return ok
        try:
            cls = import_layers()[1 if self.awq else 0]
        except ImportError as e:  # found, but it or one of its --no-deps dependencies does not import
            return Availability(False, f"gptqmodel does not import ({str(e).splitlines()[0]}); {INSTALL_HINT}")
        ok, err = cls.validate(bits=4, group_size=weight.group_size, desc_act=weight.perm is not None, sym=False,
                               in_features=weight.in_features, out_features=weight.out_features,
                               pack_dtype=torch.int32, dtype=dtype, device=device)
        if not ok:
            return Availability(False, f"{cls.__name__}: {str(err).splitlines()[0] if err else 'refused'}")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return GPTQModelLinear(weight, bias, self.awq)


@register_kernel
class GPTQModelTorchKernel(_GPTQModelKernel):
    name = "gptqmodel-torch"
    layouts = ("gptq",)
    description = "GPTQModel's TorchLinear on GPTQ v2 tensors: dequantize + matmul, fp16/bf16, any device"


@register_kernel
class GPTQModelAwqTorchKernel(_GPTQModelKernel):
    name = "gptqmodel-awq-torch"
    layouts = ("awq",)
    description = "GPTQModel's AwqTorchLinear on AWQ GEMM tensors: dequantize + matmul, fp16/bf16, any device"
    awq = True

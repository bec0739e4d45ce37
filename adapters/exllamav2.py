"""exllamav2: its GPTQ kernel (`gemm_half_q_half`) on GPTQ v1 tensors, CUDA and fp16 only.

exllamav2 0.3.x ships as a pure-Python wheel; its CUDA extension is compiled by torch's JIT
loader on the first `import exllamav2.ext` (about 3 minutes on an H100). The build is kept
in quantbridge's cache (`TORCH_EXTENSIONS_DIR`) and reused; an `exllamav2_ext` module
already importable (a prebuilt wheel, or a build copied onto `PYTHONPATH`) is used as is.

The layer hands exllamav2 the tensors a GPTQ v1 checkpoint stores (qweight, qzeros holding
zero-point - 1, fp16 scales, g_idx for act-order) through `ext.make_q_matrix`, which
shuffles qweight in place into its own order and returns a handle that points into those
tensors: the layer keeps them, encodes them again from a kept canonical copy and makes a new
handle when they move, and frees the handle with the layer. Large M is exllamav2's own path: it dequantizes into a scratch buffer (at most
`MAX_DQ_SIZE` elements at a time, exllamav2's default) and calls cuBLAS.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import torch

from quantbridge.formats.gptq import GPTQCodec
from quantbridge.plugin.availability import Availability, dist_version, pip_extra
from quantbridge.plugin.files import cache_dir
from quantbridge.plugin.kernel import Kernel, register_kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

MAX_DQ_SIZE = 512 * 1024**2  # elements dequantized at once for large M: ExLlamaV2Config.max_dq_size
INSTALL_HINT = pip_extra("exllamav2")


def _version() -> str | None:
    return dist_version("exllamav2")


def _ext():
    """exllamav2's extension module; the first call may compile it (minutes), into our cache."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    from exllamav2 import ext

    return ext


class _Scratch:
    """One dequantization buffer per device, shared by every layer (as exllamav2's device
    context shares its scratch). A layer that needs more gets a larger one; handles made
    earlier keep theirs, which stays alive through the layer's reference."""

    buffers: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def get(cls, device: torch.device, elements: int) -> torch.Tensor:
        buf = cls.buffers.get(device)
        if buf is None or buf.numel() < elements:
            buf = torch.empty(1 << max(elements - 1, 1).bit_length(), dtype=torch.float16, device=device)
            cls.buffers[device] = buf
        return buf


class ExllamaV2Linear(QuantLinear):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None) -> None:
        super().__init__(weight.in_features, weight.out_features)
        t = GPTQCodec("gptq").encode(weight)  # v1: what exllamav2 reads (zero-point - 1)
        self.register_buffer("qweight", t["qweight"].contiguous())
        self.register_buffer("qzeros", t["qzeros"].contiguous())
        self.register_buffer("scales", t["scales"].to(torch.float16).contiguous())
        self.register_buffer("g_idx", t["g_idx"].to(torch.int32) if weight.perm is not None else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float16).clone())
        self.register_buffer("q_perm", None)
        self.register_buffer("q_invperm", None)
        self.group_size = weight.group_size
        self.kernel = f"exllamav2 {_version()} gemm_half_q_half"
        self._canonical = (weight.to("cpu"), None if bias is None else bias.detach().cpu())  # to rebuild after a move
        self._handle: int | None = None
        self._key: tuple | None = None
        self._make_handle()

    def _tensor_key(self) -> tuple:
        return tuple(t.data_ptr() if t is not None else None for t in (self.qweight, self.qzeros, self.scales, self.bias))

    def _make_handle(self) -> None:
        self._free()
        if not self.qweight.is_cuda:
            return  # a handle only on CUDA; forward says so
        ext = _ext()
        n = self.out_features
        temp_dq = _Scratch.get(self.qweight.device, n * min(self.in_features, MAX_DQ_SIZE // n))
        w = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        if self.bias is not None:
            w["bias"] = self.bias
        if self.g_idx is not None:
            w["g_idx"] = self.g_idx
        self._handle = ext.make_q_matrix(w, temp_dq, max_dq_rows=MAX_DQ_SIZE // n)
        if "q_perm" in w:  # act-order: the permutation exllamav2 made; the handle points into it
            self.q_perm, self.q_invperm = w["q_perm"], w["q_invperm"]
        self._temp_dq = temp_dq
        self._key = self._tensor_key()

    def _free(self) -> None:
        if self._handle is not None:
            _ext().ext_c.free_q_matrix(self._handle)
            self._handle = None

    def __del__(self) -> None:
        try:
            self._free()
        except Exception:  # interpreter shutdown: the extension may be gone already
            pass

    def _apply(self, fn, *args, **kwargs):
        # The handle points into the buffers, and exllamav2 shuffled qweight in place: after a
        # move (.to/.cuda) the tensors are encoded again from the kept canonical copy on the new
        # device and a new handle made; the old one is freed first, never left pointing at freed memory.
        before = self._tensor_key()
        out = super()._apply(fn, *args, **kwargs)
        if self._tensor_key() != before or (self._handle is None and self.qweight.is_cuda):
            self._free()
            weight, bias = self._canonical
            dev = self.qweight.device
            t = GPTQCodec("gptq").encode(weight.to(dev))
            self.qweight, self.qzeros = t["qweight"].contiguous(), t["qzeros"].contiguous()
            self.scales = t["scales"].to(torch.float16).contiguous()
            self.g_idx = t["g_idx"].to(torch.int32) if weight.perm is not None else None
            self.bias = None if bias is None else bias.to(dev, torch.float16)
            self.q_perm = self.q_invperm = None
            self._make_handle()
        return out

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.q_perm)
                   if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The weight as exllamav2 reconstructs it from its own layout (`ext_c.reconstruct`)."""
        if self._handle is None:
            raise RuntimeError("exllamav2 reconstructs weights on CUDA only")
        out = torch.empty(self.in_features, self.out_features, dtype=torch.float16, device=self.qweight.device)
        # reconstruct writes each row back to q_perm[row] (its source row in q_matrix.cu's
        # reconstruct kernels): the output is in input-feature order already, act-order or not.
        _ext().ext_c.reconstruct(self._handle, out)
        return out.float().t().cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._handle is None:
            raise RuntimeError("exllamav2 runs on CUDA only")
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float16, device=x.device)
        _ext().ext_c.gemm_half_q_half(x2, self._handle, out, False)
        return out.reshape(*x.shape[:-1], self.out_features)


@register_kernel
class ExllamaV2Kernel(Kernel):
    name = "exllamav2"
    activation_dtypes = (torch.float16,)
    layouts = ("gptq",)
    description = "exllamav2's GPTQ kernel (gemm_half_q_half), fp16 activations, CUDA"
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        v = _version()
        if v is None or find_spec("exllamav2") is None:
            return Availability(False, "exllamav2 is not installed (0.3.2; its CUDA extension builds on first use)")
        if device.type != "cuda":
            return Availability(False, f"exllamav2 {v} has CUDA kernels only")
        return Availability(True, f"exllamav2 {v}")

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        if not (ok := self.dtype_check(dtype)).ok:
            return ok
        if weight.out_features % 8:
            return Availability(False, f"out_features {weight.out_features} not divisible by 8")
        if weight.perm is not None and weight.in_features > 65535:
            return Availability(False, "act-order needs in_features below 65536 (16-bit permutation)")
        if bool((weight.zeros == 0).any()):
            return Availability(False, "GPTQ v1 (exllamav2's format) cannot hold a zero-point of 0 (use --symmetric)")
        return Availability(True, "")

    def build(self, weight: Int4Weight, bias: torch.Tensor | None) -> QuantLinear:
        return ExllamaV2Linear(weight, bias)

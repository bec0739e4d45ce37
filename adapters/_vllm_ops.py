"""vLLM's compiled INT4 kernels (torch.ops._C), loaded without starting vLLM.

Importing `vllm` detects platforms and pulls in the whole engine, so nothing here imports it:
the installed package is found with `importlib.util.find_spec` (which locates a top-level package
without running it), its version is read from the `vllm-*.dist-info` beside it (or its
`_version.py`, read as text), its kernel library is loaded with `torch.ops.load_library`, and
the weight type ids the ops take are read from `vllm/scalar_type.py` loaded as one file (it
imports only the standard library).

Only vLLM releases whose library name and op schemas were compared with what the adapters call
are used (`RELEASES`); another version is refused in one line (`QUANTBRIDGE_VLLM_UNCHECKED=1`
tries it anyway with the newest checked release's expectations; the schemas are still
compared). After loading, every op a kernel calls is compared with the schema the adapter was
written against (`torch.ops._C.<op>.default._schema`: argument names and types, and returns); a
difference is that kernel's one-line reason, never a crash.

Checked: vLLM 0.26.0 (its wheel pins torch 2.11.0): the ops are in
`vllm/_C_stable_libtorch.abi3.so` (libtorch's stable ABI), with the schemas below, read from
that library in the manylinux_2_28_x86_64 wheel. Not checked, so refused: every other version.
(From vLLM's pull requests: the INT4 ops moved from `_C.abi3.so` into `_C_stable_libtorch` over
the 0.2x releases, Machete among the last; and the current sources' `marlin_gemm` has dropped
its act-order arguments, so a later library would fail the schema check as well.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from itertools import zip_longest
from pathlib import Path
from typing import ClassVar

import torch

from quantbridge.plugin.availability import Availability, pip_extra
from quantbridge.plugin.kernel import Kernel
from quantbridge.plugin.layer import QuantLinear
from quantbridge.plugin.packed import Int4Weight

NAMESPACE = "_C"  # the torch.ops namespace vLLM registers its kernels in
UNCHECKED_ENV = "QUANTBRIDGE_VLLM_UNCHECKED"
INSTALL_HINT = pip_extra("vllm-kernels")
TYPES = ("uint4b8", "uint4")  # the weight types the adapters hand the ops

# The op schemas of vLLM 0.26.0's _C_stable_libtorch.abi3.so, as registered in it.
SCHEMAS_0_26 = {
    "marlin_gemm": "marlin_gemm(Tensor a, Tensor? c_or_none, Tensor b_q_weight, Tensor? b_bias_or_none, "
                   "Tensor b_scales, Tensor? a_scales, Tensor? global_scale, Tensor? b_zeros_or_none, "
                   "Tensor? g_idx_or_none, Tensor? perm_or_none, Tensor workspace, int b_type_id, SymInt size_m, "
                   "SymInt size_n, SymInt size_k, bool is_k_full, bool use_atomic_add, bool use_fp32_reduce, "
                   "bool is_zp_float) -> Tensor",
    "gptq_marlin_repack": "gptq_marlin_repack(Tensor b_q_weight, Tensor perm, SymInt size_k, SymInt size_n, "
                          "int num_bits, bool is_a_8bit) -> Tensor",
    "machete_mm": "machete_mm(Tensor A, Tensor B, int b_type, ScalarType? out_type, Tensor? group_scales, "
                  "Tensor? group_zeros, int? group_size, Tensor? channel_scales, Tensor? token_scales, "
                  "str? schedule) -> Tensor",
    "machete_prepack_B": "machete_prepack_B(Tensor B, ScalarType a_type, int b_type, "
                         "ScalarType? group_scales_type) -> Tensor",
    "permute_cols": "permute_cols(Tensor A, Tensor perm) -> Tensor",
    "gptq_gemm": "gptq_gemm(Tensor a, Tensor b_q_weight, Tensor b_gptq_qzeros, Tensor b_gptq_scales, "
                 "Tensor b_g_idx, bool use_exllama, bool use_v2_format, int bit) -> Tensor",
    "gptq_shuffle": "gptq_shuffle(Tensor! q_weight, Tensor q_perm, int bit) -> ()",
}


@dataclass(frozen=True)
class Release:
    library: str  # the kernel library's file name inside the vllm package
    torch: str  # the torch its wheel pins
    schemas: dict[str, str] = field(default_factory=dict)


RELEASES = {"0.26.0": Release("_C_stable_libtorch.abi3.so", "2.11.0", SCHEMAS_0_26)}
CHECKED = ", ".join(RELEASES)


@dataclass(frozen=True)
class Found:
    """What is installed, before anything is loaded: the package, its version, the library file."""

    package: Path | None = None
    version: str | None = None
    release: Release | None = None
    library: Path | None = None
    unchecked: bool = False  # a version not in RELEASES, tried because UNCHECKED_ENV is set
    problem: str | None = None  # why these kernels cannot be used (one line); None when all is found

    @property
    def label(self) -> str:
        """'vLLM 0.26.0 (_C_stable_libtorch.abi3.so)' for the reasons and the kernel names."""
        lib = f" ({self.library.name})" if self.library else ""
        return f"vLLM {self.version}{lib}" + (" [unchecked version]" if self.unchecked else "")


@dataclass
class Loaded:
    """The library loaded: which ops are usable (None) or why not, and the weight type ids."""

    found: Found
    problem: str | None = None
    ops: dict[str, str | None] = field(default_factory=dict)
    type_ids: dict[str, int] = field(default_factory=dict)


_found: Found | None = None
_loaded: Loaded | None = None


def reset() -> None:
    """Forget what was found and loaded (tests lay out another package)."""
    global _found, _loaded
    _found = _loaded = None


def _public(v: str) -> str:
    return v.split("+", 1)[0]


def read_version(package: Path) -> str | None:
    """The version of the vllm package at `package`, without importing it: the METADATA of a
    vllm-*.dist-info beside it (how pip lays out an install), else the installed distribution's,
    else vllm/_version.py read as text."""
    for dist in sorted(package.parent.glob("vllm-*.dist-info")):
        meta = dist / "METADATA"
        if meta.is_file():
            m = re.search(r"^Version:\s*(\S+)", meta.read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
    try:
        return version("vllm")
    except PackageNotFoundError:
        pass
    vfile = package / "_version.py"
    if vfile.is_file():
        m = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", vfile.read_text(errors="replace"))
        if m:
            return m.group(1)
    return None


def locate() -> Found:
    """Find the installed vllm package, its version and its kernel library file (cached)."""
    global _found
    if _found is None:
        _found = _locate()
    return _found


def find_vllm_spec():
    """importlib.util.find_spec("vllm"): locates the package without running it (tests stand in for it)."""
    return importlib.util.find_spec("vllm")


def _locate() -> Found:
    try:
        spec = find_vllm_spec()
    except (ImportError, ValueError) as e:
        return Found(problem=f"vllm could not be looked up ({type(e).__name__}: {e})")
    if spec is None or not spec.submodule_search_locations:
        return Found(problem=f"vLLM {CHECKED} is not installed (only its kernel library is loaded)")
    package = Path(next(iter(spec.submodule_search_locations)))
    v = read_version(package)
    if v is None:
        return Found(package, problem=f"vllm at {package}: its version cannot be read (no vllm-*.dist-info beside "
                                      "it, no vllm/_version.py)")
    release, unchecked = RELEASES.get(_public(v)), False
    if release is None:
        if os.environ.get(UNCHECKED_ENV) != "1":
            return Found(package, v, problem=f"vLLM {v} is installed, but only vLLM {CHECKED}'s kernel library and "
                                             f"op schemas were checked against these adapters (set {UNCHECKED_ENV}=1 "
                                             "to try it; its op schemas are still compared)")
        release, unchecked = RELEASES[list(RELEASES)[-1]], True
    library = package / release.library
    if not library.is_file():
        return Found(package, v, release, None, unchecked,
                     problem=f"vLLM {v} at {package} has no kernel library {release.library} (a CPU or ROCm build, "
                             "or a partial copy)")
    return Found(package, v, release, library, unchecked)


def load_library(path: Path) -> None:
    """torch.ops.load_library (a separate name so tests can stand in for it)."""
    torch.ops.load_library(str(path))


def load() -> Loaded:
    """Load the library once and check each op's schema and the scalar type ids (cached)."""
    global _loaded
    if _loaded is None:
        _loaded = _load(locate())
    return _loaded


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load(found: Found) -> Loaded:
    if found.problem:
        return Loaded(found, found.problem)
    try:
        load_library(found.library)
    except Exception as e:  # noqa: BLE001 - whatever dlopen or the op registrations raise is one reason
        cause = e.__cause__ or e.__context__  # torch's "Could not load this library" wraps dlopen's own words
        return Loaded(found, f"{found.label} failed to load: {_first_line(e)}"
                             + (f" ({_first_line(cause)})" if cause is not None else ""))
    try:
        ids = read_type_ids(found.package / "scalar_type.py")
    except Exception as e:  # noqa: BLE001 - a missing or changed scalar_type.py
        return Loaded(found, f"{found.label}: vllm/scalar_type.py could not be read ({_first_line(e)})")
    return Loaded(found, None, {op: schema_problem(op, s) for op, s in found.release.schemas.items()}, ids)


def read_type_ids(path: Path) -> dict[str, int]:
    """The ids of TYPES from vLLM's scalar_type.py, loaded as one file (it imports the standard
    library only), never as part of the vllm package."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path}")
    name = "_quantbridge_vllm_scalar_type"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return {t: int(getattr(module.scalar_types, t).id) for t in TYPES}


def _arg(a) -> tuple[str, str]:
    """(name, type as declared: ScalarType stays ScalarType, a mutated Tensor is Tensor!)."""
    written = a.alias_info is not None and a.alias_info.is_write
    return a.name, str(getattr(a, "real_type", a.type)) + ("!" if written else "")


def _describe(arg) -> str:
    return "nothing" if arg is None else f"'{arg[1]} {arg[0]}'"


def schema_problem(op: str, expected: str) -> str | None:
    """None when torch.ops.<NAMESPACE>.<op> is registered with the schema the adapter calls
    (argument names and types in order, and return types), else what differs, in one line."""
    ns = getattr(torch.ops, NAMESPACE)
    try:
        actual = getattr(ns, op).default._schema
    except (AttributeError, RuntimeError):
        return f"{op} is not in the library"
    want = torch._C.parse_schema(expected)
    got_args, want_args = [_arg(a) for a in actual.arguments], [_arg(a) for a in want.arguments]
    for i, (g, w) in enumerate(zip_longest(got_args, want_args)):
        if g != w:
            return f"{op}'s argument {i} is {_describe(g)} where the adapter passes {_describe(w)}"
    got_ret, want_ret = [str(r.type) for r in actual.returns], [str(r.type) for r in want.returns]
    if got_ret != want_ret:
        return f"{op} returns ({', '.join(got_ret)}) where the adapter expects ({', '.join(want_ret)})"
    return None


def check(device: torch.device, ops: tuple[str, ...]) -> Availability:
    """A kernel's `available`: vLLM found, a checked version, CUDA, the library loaded, and every op
    in `ops` registered with the schema its adapter calls."""
    found = locate()
    if found.problem:
        return Availability(False, found.problem)
    if device.type != "cuda":
        return Availability(False, f"{found.label} found; its kernels run on CUDA only")
    if not torch.cuda.is_available():
        return Availability(False, f"{found.label} found; torch {torch.__version__} sees no CUDA device")
    loaded = load()
    if loaded.problem:
        return Availability(False, loaded.problem)
    bad = [f"{op}: {loaded.ops[op]}" if op in loaded.ops else f"{op}: not checked for vLLM {found.version}"
           for op in ops if loaded.ops.get(op, "unchecked")]
    if bad:
        return Availability(False, f"{found.label}: " + "; ".join(bad))
    return Availability(True, f"{found.label}: {', '.join(ops)}")


def op(name: str):
    """The loaded op `name` (after `check` said it is usable)."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def type_id(name: str) -> int:
    return load().type_ids[name]


def label() -> str:
    """'vLLM 0.26.0' (the version that runs, for a layer's `kernel`)."""
    f = locate()
    return f"vLLM {f.version}" + (" [unchecked version]" if f.unchecked else "")


def capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA device's compute capability; None where it cannot be asked (no CUDA here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def first_problem(problems: list[str]) -> Availability:
    return Availability(False, problems[0]) if problems else Availability(True, "")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class VllmKernel(Kernel):
    """A vLLM kernel: available when the library and its `ops` are; `rules` says which weights it
    takes (vLLM's own can_implement, restated), given the device's compute capability when known."""

    ops: ClassVar[tuple[str, ...]] = ()
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        return check(device, self.ops)

    def rules(self, weight: Int4Weight, dtype: torch.dtype, cap: tuple[int, int] | None) -> list[str]:
        raise NotImplementedError

    def can_implement(self, weight: Int4Weight, device: torch.device, dtype: torch.dtype) -> Availability:
        return first_problem(self.rules(weight, dtype, capability(device)))


class VllmLinear(QuantLinear):
    """A layer over vLLM ops: `_mm(x2d, bias)` runs the kernel (with or without the layer's bias);
    `dequantize` is the weight as the kernel itself multiplies: the layer applied to the identity,
    DEQUANT_ROWS rows at a time (vLLM's INT4 kernels have no reconstruct op)."""

    DEQUANT_ROWS = 2048
    _stored: tuple[str, ...] = ()  # buffers that count as the stored weight
    _cuda_only = True  # vLLM's ops are CUDA kernels (tests run the layers' plumbing over CPU stand-ins)

    def __init__(self, weight: Int4Weight) -> None:
        super().__init__(weight.in_features, weight.out_features)
        self.dtype = weight.scales.dtype
        self.group_size = weight.group_size

    def _mm(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        raise NotImplementedError

    def _with_bias(self, out: torch.Tensor, bias: bool) -> torch.Tensor:
        """For ops that take no bias: the layer's added in place (when asked and there is one)."""
        if bias and self.bias is not None:
            out.add_(self.bias)
        return out

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._stored) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return self._mm(x2, True).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        dev = next(iter(self.buffers())).device
        if dev.type != "cuda" and self._cuda_only:
            raise RuntimeError("vLLM's kernels run on CUDA only; this layer is on " + str(dev))
        k, n = self.in_features, self.out_features
        out = torch.empty(n, k, dtype=torch.float32)
        for start in range(0, k, self.DEQUANT_ROWS):
            rows = min(self.DEQUANT_ROWS, k - start)
            eye = torch.zeros(rows, k, dtype=self.dtype, device=dev)
            eye[:, start:start + rows] = torch.eye(rows, dtype=self.dtype, device=dev)
            out[:, start:start + rows] = self._mm(eye, False).float().t().cpu()
        return out

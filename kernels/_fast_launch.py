"""Launch a compiled Triton kernel without re-running Triton's argument binder each call.

`kernel[grid](...)` re-derives the specialization of every argument (dtype, 16-byte
alignment, value 1) and hashes it on every call: tens of microseconds of host time, which
in eager decode is longer than the kernel itself (benchmarks/launch_overhead.py). The first
call per specialization goes through Triton as usual and returns the compiled kernel; later
calls with the same specialization call its launcher directly.

`raw_launcher(kernel)` goes one step further for callers that fix a specialization once
(int4_triton.BoundLinear): the compiled launcher's C entry point, called with the grid,
stream and every pointer as a plain integer. Triton's launcher then skips its Python
wrapper, the launch-metadata dictionary, the (empty) hook chains and, for each pointer
given as an integer, the `data_ptr()` call and the driver's pointer-attribute query.
`tma_launcher(kernel)` does the same for a kernel that takes host-side TMA descriptors
(the Gluon tile): Triton wraps its C entry in Python that encodes every descriptor on
every call; a caller that binds one encodes the fixed ones once (TmaLauncher.fill).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


_RUNTIME = knobs.runtime


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """SMs of a CUDA device: how many programs a grid sized to the GPU (stream-K, cooperative) has."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def hooks_active() -> bool:
    """Whether a launch hook (e.g. Triton's profiler) wants to see every launch."""
    enter, leave = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True))


def run_compiled(kernel, grid: tuple[int, int, int], device_index: int, args: tuple) -> None:
    """Launch a compiled kernel through its own launcher on the device's current stream, as Triton's
    launch path ends: every argument of its signature in order (constexprs included), no binder."""
    stream = driver.active.get_current_stream(device_index)
    enter, leave = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
    meta = kernel.launch_metadata(grid, stream, *args) if enter is not None else None
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta, enter, leave,
               *args)


def _hook(h):
    # Triton 3.6 keeps the hooks in a HookChain that is never None: pass None when it is
    # empty, so the launcher does not call into Python twice per launch for nothing.
    return h if h is not None and getattr(h, "calls", True) else None


class RawLauncher:
    """A compiled kernel's C launcher with everything fixed but the grid, stream and arguments.

    Call as fn(gx, gy, gz, stream, function, coop, pdl, None, None, metadata, None, None, None, *args),
    taking `function`, `coop`, `pdl`, `metadata` from this object (see BoundLinear)."""

    __slots__ = ("fn", "function", "coop", "pdl", "metadata")

    def __init__(self, fn, function, coop, pdl, metadata) -> None:
        self.fn, self.function, self.coop, self.pdl, self.metadata = fn, function, coop, pdl, metadata


def raw_launcher(kernel) -> RawLauncher | None:
    """The C entry point of a compiled kernel's launcher, or None where it cannot be called
    directly (interpreter, a kernel that needs Triton-allocated scratch memory, another launcher)."""
    # The C launcher's positional arguments below are Triton 3.6's; another release may order
    # them differently, so it takes the (slower, checked) FastLauncher path instead.
    if kernel is None or _INTERPRET or not triton.__version__.startswith("3.6."):
        return None
    run = kernel.run
    launch = getattr(run, "launch", None)
    if launch is None or getattr(run, "num_ctas", 1) != 1:
        return None
    if getattr(run, "global_scratch_size", 0) or getattr(run, "profile_scratch_size", 0):
        return None
    try:
        return RawLauncher(launch, kernel.function, run.launch_cooperative_grid, run.launch_pdl,
                           kernel.packed_metadata)
    except AttributeError:
        return None


class TmaLauncher:
    """A compiled kernel's C launcher under Triton's descriptor wrapper. `fn` takes what
    RawLauncher's does, each TMA descriptor as (encoded map, *shape, *strides) in its place;
    `fill(address, *encodings[i], shape, strides, 0)` encodes descriptor i's map (one driver
    call): its swizzle, element size, element type and box as the kernel was compiled for."""

    __slots__ = ("fn", "function", "coop", "pdl", "metadata", "encodings", "fill")

    def __init__(self, fn, function, coop, pdl, metadata, encodings, fill) -> None:
        self.fn, self.function, self.coop, self.pdl, self.metadata = fn, function, coop, pdl, metadata
        self.encodings, self.fill = encodings, fill


def tma_launcher(kernel) -> TmaLauncher | None:
    """The C entry point under the host-side-descriptor wrapper of a compiled kernel's launcher, or
    None where it cannot be called directly (as raw_launcher; or descriptors not lowered to TMA)."""
    if kernel is None or _INTERPRET or not triton.__version__.startswith("3.6."):
        return None
    run = kernel.run
    wrapper = getattr(run, "launch", None)
    cells = getattr(wrapper, "__closure__", None)
    if not cells or getattr(run, "num_ctas", 1) != 1:
        return None
    if getattr(run, "global_scratch_size", 0) or getattr(run, "profile_scratch_size", 0):
        return None
    # Triton 3.6's wrap_handle_tensordesc closes over the C launcher and each descriptor's metadata,
    # and encodes each descriptor as its make_tensordesc_arg does (zero padding, no fp4 padding here)
    from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST

    free = dict(zip(wrapper.__code__.co_freevars, (c.cell_contents for c in cells)))
    metas = free.get("tensordesc_meta")
    if "launcher" not in free or not metas or any(m is None or m.get("fp4_padded") for m in metas):
        return None
    try:
        encodings = tuple((m["swizzle"], m["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]], m["block_size"])
                          for m in metas)
        return TmaLauncher(free["launcher"], kernel.function, run.launch_cooperative_grid, run.launch_pdl,
                           kernel.packed_metadata, encodings, driver.active.utils.fill_tma_descriptor)
    except (AttributeError, KeyError):
        return None


class FastLauncher:
    """Call as launcher(grid, tensors, ints, constexprs, num_warps, num_stages): the kernel's
    arguments are its tensors, then its runtime integers, then its constexprs, in that order.
    It returns the compiled kernel it launched (None in the interpreter)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, int, int], tensors: tuple, ints: tuple, constexprs: tuple,
                 num_warps: int = 4, num_stages: int = 3):
        dev = tensors[0].get_device()
        # Triton's default specialization: tensor dtype and 16-byte alignment; integers equal
        # to 1, divisible by 16, or past 32 bits. Same key => same compiled kernel.
        key = (dev, constexprs, num_warps, num_stages,
               tuple((t.dtype, t.data_ptr() & 15 == 0) for t in tensors),
               tuple((i == 1, i & 15 == 0, i >= 2**31) for i in ints))
        kernel = self.cache.get(key)
        if kernel is None:
            names = self.fn.arg_names[len(tensors) + len(ints):]
            kernel = self.fn[grid](*tensors, *ints, **dict(zip(names, constexprs)),
                                   num_warps=num_warps, num_stages=num_stages)
            if kernel is not None and not _INTERPRET:
                self.cache[key] = kernel
            return kernel
        run_compiled(kernel, grid, dev, (*tensors, *ints, *constexprs))
        return kernel

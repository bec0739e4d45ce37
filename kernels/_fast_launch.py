"""Launch a compiled Triton kernel without re-running Triton's argument binder each call.

`kernel[grid](...)` re-derives the specialization of every argument (dtype, 16-byte
alignment, value 1) and hashes it on every call: tens of microseconds of host time, which
in eager decode is longer than the kernel itself (benchmarks/launch_overhead.py). The first
call per specialization goes through Triton as usual and returns the compiled kernel; later
calls with the same specialization call its launcher directly.
"""

from __future__ import annotations

import os

from triton import knobs
from triton.runtime.driver import driver

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class FastLauncher:
    """Call as launcher(grid, tensors, ints, constexprs, num_warps, num_stages): the kernel's
    arguments are its tensors, then its runtime integers, then its constexprs, in that order."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, int, int], tensors: tuple, ints: tuple, constexprs: tuple,
                 num_warps: int = 4, num_stages: int = 3) -> None:
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
            return
        stream = driver.active.get_current_stream(dev)
        meta = kernel.launch_metadata(grid, stream, *tensors, *ints, *constexprs)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *tensors, *ints, *constexprs)

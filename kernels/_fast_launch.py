"""Launch a compiled Triton kernel without re-running Triton's argument binder each call.

`kernel[grid](...)` re-derives the specialization of every argument (dtype, 16-byte
alignment, value 1) and hashes it on every call: tens of microseconds of host time, which
in eager decode is longer than the kernel itself (benchmarks/launch_overhead.py). The first
call per specialization goes through Triton as usual and returns the compiled kernel; later
calls with the same specialization call its launcher directly.
"""

from __future__ import annotations

import os

import torch
from triton import knobs
from triton.runtime.driver import driver

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _spec(a) -> tuple:
    """What Triton specializes an argument on (its default rules): dtype and 16-byte alignment
    for tensors; value 1, divisibility by 16 and 64-bit range for integers."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or not isinstance(a, int):
        return (a,)
    return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)


class FastLauncher:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.cache: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, int], args: tuple, constexprs: tuple, **options) -> None:
        """args: the runtime arguments in order; constexprs: the constexpr values that follow them."""
        key = (args[0].device.index, constexprs, tuple(sorted(options.items())), tuple(_spec(a) for a in args))
        kernel = self.cache.get(key)
        if kernel is None:
            names = self.fn.arg_names[len(args):]
            kernel = self.fn[grid](*args, **dict(zip(names, constexprs)), **options)
            if kernel is not None and not _INTERPRET:
                self.cache[key] = kernel
            return
        stream = driver.active.get_current_stream(args[0].device.index)
        meta = kernel.launch_metadata(grid, stream, *args, *constexprs)
        kernel.run(grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, meta,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args, *constexprs)

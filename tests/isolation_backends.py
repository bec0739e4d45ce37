"""Backends and functions that end their own process, for tests/test_isolation.py.

The `crashing_backends` fixture registers them for one test at a time; a row's child process
imports this module and registers the same classes (compare and bench hand it each backend's
"module:qualname"). They end the process only inside a child: in-process they raise
instead, so a mistake cannot take the test run down.
"""

import os
import signal

import torch

from quantbridge.plugin import backend as registry
from quantbridge.plugin.backend import Backend
from quantbridge.run import launcher as isolation


def _end_process(how: str) -> None:
    if not isolation.in_child():
        raise RuntimeError(f"refusing to {how} the test process itself")
    if how == "exit3":
        os._exit(3)
    os.kill(os.getpid(), getattr(signal, how))


class _Crashing(Backend):
    """Native's layers, whose forward ends the process on its `after`-th call."""

    how = "SIGKILL"
    after = 3

    def quantize(self, linear, spec, calib=None):
        q = registry.get("native").quantize(linear, spec)
        calls = [0]
        forward = q.forward

        def crashing(x):
            calls[0] += 1
            if calls[0] >= self.after:
                _end_process(self.how)
            return forward(x)

        q.forward = crashing
        return q


class SigKill(_Crashing):
    name = "test-sigkill"
    how = "SIGKILL"


class Exit3(_Crashing):
    name = "test-exit3"
    how = "exit3"


class Raising(Backend):
    name = "test-raise"

    def quantize(self, linear, spec, calib=None):
        raise ValueError("kernel refused this layer\nsecond line")


BACKENDS = (SigKill, Exit3, Raising)


def register_all() -> None:
    for cls in BACKENDS:
        registry.register(cls)


def unregister_all() -> None:
    for cls in BACKENDS:
        registry.BACKENDS.classes.pop(cls.name, None)


# Plain functions for isolation.run_isolated.
def returns(x):
    return {"x": x, "t": torch.arange(4.0) * x}


def raises(x):
    raise KeyError(f"missing {x}")


def sigkill(x):
    _end_process("SIGKILL")


def sigsegv(x):
    _end_process("SIGSEGV")


def exit3(x):
    _end_process("exit3")


def returns_then_dies(x):
    import atexit
    import os

    atexit.register(os._exit, 7)  # a native library's teardown crashing after the result was handed over
    return x * 2


def sleeps(x):
    import time

    time.sleep(x)


def talks(n):
    for i in range(n):
        isolation.send(("step", i))
    return "done"

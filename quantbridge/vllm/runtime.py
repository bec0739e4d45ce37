"""What a served quantized linear runs: its quantbridge kernel, timed when profiling is on.

No vLLM import at module level, so the GPU path (custom op, torch.compile, CUDA-event
timers) is testable where vLLM is not installed. Under torch.compile the call is the
custom op `quantbridge::linear_by_index`: opaque to dynamo, so the kernel (a Triton launch
dynamo cannot trace) and the profiler's timers run on every step rather than once at trace
time. Eager execution calls the layer directly, skipping the dispatcher.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbridge.vllm import graphs
from quantbridge.vllm import profiler as prof

_LAYERS: list[tuple[str, nn.Module]] = []  # this process's quantized layers, by index


def add_layer(name: str, kernel: nn.Module) -> int:
    _LAYERS.append((name, kernel))
    return len(_LAYERS) - 1


def run(x: torch.Tensor, index: int) -> torch.Tensor:
    """[M, K] -> [M, N] through layer `index`'s kernel."""
    if torch.compiler.is_compiling():
        return torch.ops.quantbridge.linear_by_index(x, index)
    return _call(x, index)


def _forward_context():
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:  # not inside vLLM: every call counts
        return None
    return is_forward_context_available, get_forward_context


_FC = _forward_context()  # looked up once, not on every profiled call


def _is_warmup() -> bool:
    """vLLM's start-up profiling and warm-up passes run without attention metadata."""
    if _FC is None:
        return False
    available, get = _FC
    return not available() or get().attn_metadata is None


def _call(x: torch.Tensor, index: int) -> torch.Tensor:
    name, kernel = _LAYERS[index]
    p = prof._PROFILER
    if p is None:
        return kernel(x)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # Inside a CUDA graph capture: events that become graph nodes (read after replays,
        # quantbridge/vllm/graphs.py); a capture that is not vLLM's runs untimed.
        graph = graphs.capture_key()
        if graph is None:
            return kernel(x)
        a = p.graph_event()
        y = kernel(x)
        graph.add(name, a, p.graph_event())
        return y
    token = p.start(x)
    y = kernel(x)
    # A capture's eager warm-up pass and vLLM's dummy steps carry attention metadata too.
    p.stop(token, name, x.shape[0], _is_warmup() or graphs.in_warmup())
    return y


@torch.library.custom_op("quantbridge::linear_by_index", mutates_args=())
def _linear_by_index(x: torch.Tensor, index: int) -> torch.Tensor:
    return _call(x, index)


@_linear_by_index.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _LAYERS[index][1].out_features)

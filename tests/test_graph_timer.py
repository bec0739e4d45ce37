"""bench's timer: the call timed by events inside its CUDA graph, the graph's launch latency apart."""

import pytest
import torch

from quantbridge.measure.graphs import CUDA_GRAPH, EAGER, time_replays
from quantbridge.measure.probes import L2Flush
from quantbridge.report.common import flush_note


def test_cpu_calls_are_timed_eagerly_with_no_launch_figure():
    w = torch.randn(64, 64)
    xs = [torch.randn(4, 64) for _ in range(5)]
    got = time_replays(lambda x: x @ w, xs, torch.device("cpu"), L2Flush(torch.device("cpu")))
    assert got.timing == EAGER and len(got.samples) == 5 and all(s > 0 for s in got.samples)
    assert got.launch_us == []


@pytest.mark.gpu
def test_gpu_call_time_excludes_the_graph_launch():
    dev = torch.device("cuda")
    w = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    xs = [torch.randn(16, 4096, device=dev, dtype=torch.bfloat16) for _ in range(20)]
    fn = lambda x: x @ w  # noqa: E731
    fn(xs[0])  # cuBLAS's lazy workspace, before the capture (bench's warm-up calls do this)
    torch.cuda.synchronize()
    got = time_replays(fn, xs, dev, L2Flush(dev))
    assert got.timing == CUDA_GRAPH and len(got.samples) == len(got.launch_us) == 20
    # Each replay's whole time is the call's plus a launch latency of a few µs, never less.
    assert all(s > 0 for s in got.samples) and all(0 < d < 1000 for d in got.launch_us)


def test_l2_flush_ways():
    cpu = torch.device("cpu")
    assert not L2Flush(cpu, by="read").active  # nothing to evict on the CPU; calling it is a no-op
    L2Flush(cpu, by="read")()
    with pytest.raises(ValueError, match="'write' or 'read'"):
        L2Flush(cpu, by="memset")
    assert L2Flush(cpu).by == "read" and L2Flush(cpu).setting is None  # results record None: not flushed


def test_flush_note_names_how_results_were_flushed():
    # Results written before the read flush record True; their flush wrote the buffer.
    assert flush_note("read") == "L2 flushed between runs by reads"
    assert flush_note("write") == flush_note(True) == "L2 flushed between runs by writes"
    assert flush_note(None) == flush_note(False) == "L2 not flushed"


@pytest.mark.gpu
def test_gpu_read_flush_evicts_without_writing():
    dev = torch.device("cuda")
    f = L2Flush(dev, by="read")
    before = f.buf.clone()
    f()
    torch.cuda.synchronize()
    assert f.active and torch.equal(f.buf, before)  # read, not written

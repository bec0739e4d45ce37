"""Probes: every layer timed on every call, captured I/O, errors, hooks removed afterwards."""

import torch
from torch import nn

from quantbridge.measure.probes import LayerTimer, capture_io, isolated_error, propagated_error, time_calls


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.GELU(), nn.Linear(32, 8))


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_timer_records_every_call_and_detaches():
    model = _mlp()
    lins = _linears(model)
    inputs = [torch.randn(4, 64) for _ in range(7)]
    with LayerTimer(lins, torch.device("cpu"), len(inputs)) as t:
        for x in inputs:
            model(x)
    samples = t.samples_us()
    assert set(samples) == set(lins)
    assert all(len(v) == 7 and all(s > 0 for s in v) for v in samples.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lins.values())


def test_time_calls_counts_and_between():
    calls = []
    out = time_calls(lambda x: x.sum(), [torch.randn(8) for _ in range(5)], torch.device("cpu"),
                     between=lambda: calls.append(1))
    assert len(out) == 5 and len(calls) == 5 and all(v > 0 for v in out)


def test_capture_and_errors_against_float64():
    ref_model, other = _mlp(0), _mlp(0)
    with torch.no_grad():
        other[2].weight.mul_(1.05)  # perturb one layer by 5 %
    x = torch.randn(16, 64)
    with capture_io(_linears(ref_model)) as io:
        ref_model(x)
    assert set(io) == {"0", "2", "4"}
    torch.testing.assert_close(io["0"][1], ref_model[0](x))

    with propagated_error(_linears(other), io) as prop:
        other(x)
    iso = {n: isolated_error(m, *io[n], torch.device("cpu"), torch.float32) for n, m in _linears(other).items()}
    assert iso["0"].rel_l2 == 0 and prop["0"].rel_l2 == 0
    # layer 2 alone: W' = 1.05 W, so the isolated error is 0.05 * ||xW|| / ||xW + b||
    x2 = io["2"][0].double()
    w, b = ref_model[2].weight.double(), ref_model[2].bias.double()
    expected = (0.05 * (x2 @ w.T)).norm() / (x2 @ w.T + b).norm()
    assert abs(iso["2"].rel_l2 - expected.item()) < 1e-5
    # the last layer has no error of its own, but inherits layer 2's
    assert iso["4"].rel_l2 == 0 and prop["4"].rel_l2 > 1e-3


def test_host_only_timer_records_host_time_and_no_device_marks():
    model = _mlp(3)
    lins = _linears(model)
    with LayerTimer(lins, torch.device("cpu"), device_time=False) as t:
        for _ in range(4):
            model(torch.randn(5, 64))
    host = t.host_samples_us()
    assert set(host) == set(lins) and all(len(v) == 4 and min(v) > 0 for v in host.values())
    assert all(not pairs for pairs in t.samples_us().values())  # no device clock was read
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lins.values())

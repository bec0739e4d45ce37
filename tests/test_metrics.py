import math

import pytest
import torch

from quantbridge.measure.metrics import error_stats, summarize


def test_known_relative_error_and_sqnr():
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e = error_stats(ref * 1.1, ref)
    assert e.rel_l2 == pytest.approx(0.1, rel=1e-9)
    assert e.sqnr_db == pytest.approx(20.0, rel=1e-9)
    assert e.cosine == pytest.approx(1.0, abs=1e-12)


def test_exact_and_orthogonal():
    ref = torch.randn(64, 8)
    e = error_stats(ref.clone(), ref)
    assert e.rel_l2 == 0 and math.isinf(e.sqnr_db) and e.cosine == pytest.approx(1.0)
    a = torch.tensor([1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([0.0, 3.0, 0.0, 1.0])
    e = error_stats(a, b)
    assert e.cosine == pytest.approx(0.0, abs=1e-15)
    assert e.rel_l2 == pytest.approx(math.sqrt(15 / 10))


def test_nan_output_is_nan_error():
    ref = torch.randn(10)
    out = ref.clone()
    out[3] = float("nan")
    assert math.isnan(error_stats(out, ref).rel_l2)


def test_summarize_quantiles():
    s = summarize(list(range(1, 102)))  # 1..101
    assert (s.median, s.p10, s.p90, s.n) == (51, 11, 91, 101)

"""Error metrics and summary statistics. All error math is done in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ErrorStats:
    rel_l2: float   # ||out - ref|| / ||ref||
    sqnr_db: float  # 10 log10(||ref||^2 / ||out - ref||^2); inf when exact
    cosine: float   # <out, ref> / (||out|| ||ref||)


def error_stats(out: torch.Tensor, ref: torch.Tensor) -> ErrorStats:
    o = out.detach().to(torch.float64).flatten()
    r = ref.detach().to(torch.float64).flatten()
    if o.shape != r.shape:
        raise ValueError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(o).all():  # a NaN/Inf output is a failure, not a large error
        return ErrorStats(rel_l2=math.nan, sqnr_db=math.nan, cosine=math.nan)
    noise = torch.linalg.vector_norm(o - r).item()
    signal = torch.linalg.vector_norm(r).item()
    onorm = torch.linalg.vector_norm(o).item()
    rel = noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (20 * math.log10(signal / noise) if signal > 0 else -math.inf)
    denom = signal * onorm
    cos = torch.dot(o, r).item() / denom if denom > 0 else (1.0 if noise == 0 else 0.0)
    return ErrorStats(rel_l2=rel, sqnr_db=sqnr, cosine=cos)


@dataclass
class Summary:
    median: float
    p10: float
    p90: float
    n: int

    def to_dict(self) -> dict:
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "n": self.n}


def summarize(samples: list[float] | torch.Tensor) -> Summary:
    t = torch.as_tensor(samples, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("no samples to summarize")
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
    return Summary(median=q[0].item(), p10=q[1].item(), p90=q[2].item(), n=t.numel())

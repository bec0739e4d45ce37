"""What the machine check recorded across rows says: how much the machine's own speed moved."""

from __future__ import annotations


def drift(records: list[dict]) -> float | None:
    """How much the machine's speed moved across rows: for each fixed work, the slowest time
    over the fastest minus 1, across every row's before and after; the largest of those.

    `records` are rows' `machine_check` dicts, or their older `machine_probe_us` dicts
    ({"before": µs, "after": µs, "work": what}). None with fewer than two rows.
    """
    times: dict[str, list[float]] = {}
    for rec in records:
        if "work" in rec and isinstance(rec["work"], dict):
            for name, w in rec["work"].items():
                times.setdefault(name, []).extend(v for v in (w.get("before_us"), w.get("after_us"))
                                                  if isinstance(v, (int, float)) and v > 0)
        else:  # results written before the machine check had two kernels
            times.setdefault("matmul", []).extend(v for k, v in rec.items()
                                                  if k in ("before", "after") and isinstance(v, (int, float)) and v > 0)
    spreads = [max(v) / min(v) - 1 for v in times.values() if len(v) >= 4]
    return max(spreads) if spreads else None


def slowdown(d: float) -> str:
    """A drift as people say it: "12%" below 100 %, "3.1×" above (never a five-digit percentage)."""
    return f"{d:.0%}" if d < 1 else f"{1 + d:.1f}×"

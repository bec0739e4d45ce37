"""What one serving-profiler flush costs to serialize: float µs samples against integer ns.

A flush (quantbridge/vllm/profiler.py) writes every kept sample while holding the serving
process's GIL. This times json.dumps of a full reservoir for LAYERS layers x M_VALUES batch sizes
(1,024 samples each) both ways, the median of REPEATS.

usage: python benchmarks/profile_flush_cost.py [LAYERS] [M_VALUES] [REPEATS]   (default 120 10 5)
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

from quantbridge.vllm.profiler import RESERVOIR


def cost_s(layers: int, m_values: int, as_ns: bool, repeats: int, rng: random.Random) -> float:
    def sample():
        us = rng.uniform(1.0, 100.0)
        return round(us * 1e3) if as_ns else us
    key = "samples_ns" if as_ns else "samples_us"
    data = {f"layer{i}": {"m": {str(m): {key: [sample() for _ in range(RESERVOIR)]} for m in range(m_values)}}
            for i in range(layers)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        json.dumps(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    layers, m_values, repeats = (int(a) for a in (sys.argv[1:] + ["120", "10", "5"][len(sys.argv) - 1:])[:3])
    rng = random.Random(0)
    n = layers * m_values * RESERVOIR
    for as_ns in (False, True):
        print(f"{n:,} samples as {'integer ns' if as_ns else 'float µs'}: "
              f"{cost_s(layers, m_values, as_ns, repeats, rng):.3f} s per json.dumps (median of {repeats})")


if __name__ == "__main__":
    main()

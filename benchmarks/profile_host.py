"""Where a native layer call spends host time: cProfile over many eager calls.

Usage: python3 benchmarks/profile_host.py [K N M]
"""

import cProfile
import pstats
import sys

import torch

from quantbridge.backend import get
from quantbridge.spec import QuantSpec


def main() -> None:
    k, n, m = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (4096, 4096, 1)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    layer = get("native").quantize(lin, QuantSpec(group_size=128))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        layer(x)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        layer(x)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

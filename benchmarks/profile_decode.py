"""One decode-shaped call of the native Triton kernel, for Nsight Compute.

  ncu --profile-from-start off --launch-skip 5 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats python3 benchmarks/profile_decode.py

Only the launches after tuning and warm-up are inside the profiler range (cudaProfilerStart), so
with --profile-from-start off ncu never profiles a tuning candidate.

Usage: python3 benchmarks/profile_decode.py [K N M [KERNEL]]   (default: 8192 28672 1, Llama-3-70B gate/up)
KERNEL: a registered kernel (marlin, machete, ...) run on round-to-nearest codes, as bench's rtn+K
rows are; without it, the native backend. ncu's --kernel-name must then match that kernel's name.
"""

import sys

import torch

from quantbridge.plugin.backend import get
from quantbridge.plugin.kernel import build_exactly
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec


def main() -> None:
    k, n, m = (int(v) for v in sys.argv[1:4]) if len(sys.argv) >= 4 else (8192, 28672, 1)
    kernel = sys.argv[4] if len(sys.argv) >= 5 else None
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    spec = QuantSpec(group_size=128)
    if kernel:
        q = build_exactly(kernel, quantize_rtn(lin.weight.detach(), spec, scale_dtype=torch.bfloat16), None)
    else:
        q = get("native").quantize(lin, spec)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(10)]
    q(xs[0])  # tuning (cached on disk) happens here
    torch.cuda.synchronize()
    for x in xs:  # warm-up: every launch of this M compiled and bound
        q(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for x in xs:
        q(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ran {kernel or 'native'} K={k} N={n} M={m}, kernel {q.kernel}")


if __name__ == "__main__":
    main()

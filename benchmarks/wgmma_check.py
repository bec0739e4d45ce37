"""Diagnose int4_wgmma on a GPU: each tile, whole and stream-K, against float64, for each number
of wgmma groups left in flight before a chunk is unpacked (IN_FLIGHT) and each stage release point
(RELEASE_LAG) and each way a stream-K tile's parts are summed (FIXUP_ROWS), on one small shape.

  python3 benchmarks/wgmma_check.py [--in-flight 0,1,2,3] [--lag 1,2] [--fixup 0,16] [--dtype bf16]
"""

from __future__ import annotations

import argparse

import torch

from quantbridge.kernels import int4_configs as kc
from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels import int4_triton as kt
from quantbridge.kernels import int4_wgmma as ws
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", default="0,1,2,3")
    ap.add_argument("--lag", default="1,2", help="int4_settings.RELEASE_LAG values")
    ap.add_argument("--fixup", default="0", help="int4_settings.FIXUP_ROWS values (0: the whole tile at once)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--shape", default="512x1024", help="NxK")
    a = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    n, k = (int(v) for v in a.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    qw = quantize_rtn(torch.randn(n, k, generator=gen), QuantSpec(group_size=128), scale_dtype=dtype).to("cuda")
    ref_w = qw.dequantize(torch.float64)
    for f, lag, fix in ((int(v), int(g), int(r)) for r in a.fixup.split(",") for g in a.lag.split(",")
                        for v in a.in_flight.split(",")):
        ws.IN_FLIGHT, settings.RELEASE_LAG, settings.FIXUP_ROWS = f, lag, fix
        for bm, bn, st in ws.configs(512, n, k, 128) + ws.configs(16, n, k, 128):
            for sk in (1, -5):
                bound = kt.BoundLinear(qw, None, config=(bm, bn, 128, sk, kc.WS_WARPS, st))
                errs = []
                for m in (1, bm, 3 * bm):
                    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
                    ref = x.double() @ ref_w.T
                    errs.append(((bound(x).double() - ref).norm() / ref.norm()).item())
                print(f"FIXUP_ROWS {fix} RELEASE_LAG {lag} IN_FLIGHT {f} tile {bm}x{bn} stages {st} split {sk}: "
                      f"rel err at M=1,{bm},{3 * bm}: "
                      + " ".join(f"{e:.2e}" for e in errs), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

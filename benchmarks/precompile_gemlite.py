"""Compile gemlite's kernels for the bench's shapes ahead of time, in parallel.

gemlite compiles its Triton kernels on first use, and where its shipped tuning (configs/h100.json)
has no entry for a shape (the Llama-3-70B ones) it compiles and times every candidate: more than
a minute a shape on the GPU machine's host CPU, one shape after another inside `bench`. Running
each (shape, dtype) once here, one process each, fills Triton's on-disk cache; `bench` then finds
its compilations there. Its own choices are still made in its own process: gemlite keeps what
it timed in memory only, so the timing done here under contention is never reused.

  python3 benchmarks/precompile_gemlite.py --shapes llama3-8b,llama3-70b --batch 1,4,16,64,128,512 --dtypes bf16,fp16
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.multiprocessing as mp

from quantbridge.run.bench import parse_shapes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _worker(rank: int, jobs: list, ms: list[int], group: int, done) -> None:
    # Never exits with an error: torch.multiprocessing stops every other process when one does,
    # and their compilations are the point.
    from quantbridge.plugin.kernel import build_exactly
    from quantbridge.plugin.packed import quantize_rtn
    from quantbridge.plugin.spec import QuantSpec

    (k, n), dt = jobs[rank]
    dtype = DTYPES[dt]
    try:
        w = quantize_rtn(torch.randn(n, k, device="cuda"), QuantSpec(group_size=group), scale_dtype=dtype)
        layer = build_exactly("gemlite", w, None)
        for m in ms:
            layer(torch.randn(m, k, device="cuda", dtype=dtype))
        torch.cuda.synchronize()
        done[rank] = 1
    except Exception as e:
        print(f"precompile_gemlite: {k}x{n} {dt}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--batch", default="1,4,16,64,128,512")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--group-size", type=int, default=128)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("precompile_gemlite: needs a CUDA GPU", file=sys.stderr)
        return 2
    jobs = [(shape, dt) for shape in parse_shapes(a.shapes) for dt in a.dtypes.split(",")]
    start = time.perf_counter()
    done = mp.Manager().list([0] * len(jobs))
    mp.spawn(_worker, args=(jobs, [int(m) for m in a.batch.split(",")], a.group_size, done), nprocs=len(jobs), join=True)
    print(f"gemlite: {sum(done)} of {len(jobs)} (shape, dtype) compiled in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

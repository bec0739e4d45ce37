"""vLLM with `--quantization quantbridge`: the cost of per-layer profiling, eager and compiled.

Runs inside a vLLM environment (the CI makes .venv-vllm). For each mode (eager or
torch.compile) and profiling off/on, starts an engine on CHECKPOINT, warms up, then times
`LLM.generate` (greedy, fixed output length) REPEATS times and reports output tokens/s
(median, min, max) and whether the per-layer stats cover every step. Writes JSON.

On a GPU, "compiled" is vLLM's default mode: torch.compile with CUDA graphs captured, so the
profiled rows time layers inside the graphs (quantbridge/vllm/graphs.py). QB_DTYPE picks the
dtype (default float32 on CPU, float16 on CUDA) and QB_MODES the modes (default eager,compiled).
Each profiled mode's directory gets overhead.json (tokens/s against the unprofiled row of the same
mode), which `quantbridge serve-stats DIR` shows; QB_KEEP_DIR=DIR keeps them under DIR/MODE.

usage: python benchmarks/vllm_profile_overhead.py CHECKPOINT OUT.json [REPEATS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = ["The quick brown fox", "def f(x):", "In the beginning there was", "class Parser:"] * 2
MAX_TOKENS = 32


def one(checkpoint: str, eager: bool, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    import torch

    dtype = os.environ.get("QB_DTYPE") or ("float16" if torch.cuda.is_available() else "float32")
    llm = LLM(model=checkpoint, quantization="quantbridge", dtype=dtype, max_model_len=256, max_num_seqs=8,
              seed=0, enforce_eager=eager, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)  # warm-up (and compilation)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate(PROMPTS, params, use_tqdm=False)
        dt = time.perf_counter() - t0  # generate() returns finished outputs: no async work left
        rates.append(sum(len(o.outputs[0].token_ids) for o in out) / dt)
    llm.llm_engine.engine_core.shutdown()
    return {"tokens_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "n": repeats}}


def timer_cost_us(calls: int = 20000) -> float:
    """Host cost of one profiled call's timers and bookkeeping (CPU path), in µs."""
    import torch

    from quantbridge.vllm.profiler import Profiler

    p = Profiler(tempfile.mkdtemp(prefix="qb-cost-"), flush_s=3600)
    x = torch.randn(1, 8)
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        p.stop(p.start(x), "layer", 1, False)
    return (time.perf_counter_ns() - t0) / calls / 1e3


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _, _, checkpoint, eager, repeats, out = sys.argv
        json.dump(one(checkpoint, eager == "1", int(repeats)), open(out, "w"))
        return
    checkpoint, out_path = sys.argv[1:3]
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    rows = []
    modes = os.environ.get("QB_MODES", "eager,compiled").split(",")
    keep = os.environ.get("QB_KEEP_DIR")
    for eager in [m == "eager" for m in modes]:
        off = None
        for profile in (False, True):
            env = {k: v for k, v in os.environ.items() if k != "QUANTBRIDGE_PROFILE_DIR"}
            prof_dir = None
            if profile:
                prof_dir = os.path.join(keep, "eager" if eager else "compiled") if keep else tempfile.mkdtemp(prefix="qb-prof-")
                os.makedirs(prof_dir, exist_ok=True)
            if prof_dir:
                env["QUANTBRIDGE_PROFILE_DIR"] = prof_dir
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, __file__, "--child", checkpoint, "1" if eager else "0",
                                    str(repeats), f.name], env=env, capture_output=True, text=True)
                if r.returncode:
                    rows.append({"eager": eager, "profile": profile, "error": r.stderr[-2000:]})
                    continue
                row = {"eager": eager, "profile": profile, **json.load(open(f.name)),
                       "startup_and_run_s": time.perf_counter() - t0}
            if prof_dir:
                from quantbridge.vllm.stats import load_workers, merge, steps

                comp = merge(load_workers(prof_dir))
                row["profiled_layers"] = len(comp.backends[0].layers)
                row["profiled_steps"] = sorted(set(steps(comp).values()))
                row["graph_rows"] = len(comp.backends) > 1
                if off is not None and "tokens_per_s" in off:
                    o, n = off["tokens_per_s"]["median"], row["tokens_per_s"]["median"]
                    json.dump({"tokens_per_s_off": o, "tokens_per_s_on": n, "source":
                               f"benchmarks/vllm_profile_overhead.py, LLM.generate, {len(PROMPTS)} prompts x "
                               f"{MAX_TOKENS} tokens, median of {repeats}, {'eager' if eager else 'compiled'}"},
                              open(os.path.join(prof_dir, "overhead.json"), "w"))
            else:
                off = row
            rows.append(row)
            print(json.dumps(row), flush=True)
    json.dump({"checkpoint": checkpoint, "prompts": len(PROMPTS), "max_tokens": MAX_TOKENS,
               "timer_cost_us_per_call": timer_cost_us(), "rows": rows},
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()

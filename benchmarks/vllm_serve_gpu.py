"""`vllm serve` with `--quantization quantbridge` on a GPU, CUDA graphs on: profiling off vs on.

For each of OFF and ON (QUANTBRIDGE_PROFILE_DIR set), starts one server on CHECKPOINT (vLLM's
defaults: torch.compile and CUDA graphs; no --enforce-eager), waits for /health, sends one
warm-up round, then ROUNDS timed rounds of the same fixed set of concurrent completions
(PROMPTS, greedy, MAX_TOKENS each, ignore_eos) and ROUNDS timed single-request rounds (decode at
M=1), and stops it (SIGINT). Output tokens/s per round; the profiled server's directory gets
overhead.json (tokens/s off vs on, medians over rounds), which `quantbridge serve-stats` shows.
Writes OUT_DIR/serve.json, OUT_DIR/profile/ (worker files) and the servers' logs. A serve.json
already in OUT_DIR keeps its rows: servers started by separate calls (an unprofiled one first,
then on and off again) pool into one comparison, each row naming its log.

usage: python benchmarks/vllm_serve_gpu.py CHECKPOINT OUT_DIR [ROUNDS] [-- extra vllm serve args]
env: QB_SERVE_ORDER (default "off,on"; "on@N": profiled with the FULL graphs' probed twins one step
     in N, its own profile directory, reported apart: N past the run's steps isolates the twins' cost), QB_SERVE_QUANTIZATION (quantbridge; empty: vLLM's own choice),
     QB_SERVE_DTYPE (float16), QB_SERVE_CONCURRENCY (16),
     QB_SERVE_MAX_TOKENS (128), QB_SERVE_TIMEOUT (health wait, s; 420)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE_PROMPTS = ["The quick brown fox", "def f(x):", "In the beginning there was", "class Parser:",
                "Once upon a time", "import numpy as np", "The capital of France is", "SELECT * FROM"]
CONCURRENCY = int(os.environ.get("QB_SERVE_CONCURRENCY", "16"))
PROMPTS = [f"{BASE_PROMPTS[i % len(BASE_PROMPTS)]} ({i})" for i in range(CONCURRENCY)]
MAX_TOKENS = int(os.environ.get("QB_SERVE_MAX_TOKENS", "128"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(base: str, model: str, prompt: str) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _round(base: str, model: str, prompts: list[str]) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: _complete(base, model, p), prompts))
    dt = time.perf_counter() - t0
    return sum(r["usage"]["completion_tokens"] for r in replies) / dt


def one_server(checkpoint: str, out_dir: Path, profile: bool, rounds: int, extra: list[str],
               full_every: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "QUANTBRIDGE_PROFILE_DIR"}
    if profile:
        env["QUANTBRIDGE_PROFILE_DIR"] = str(out_dir / ("profile" if full_every is None else f"profile-every{full_every}"))
    if full_every is not None:  # the probed twins' share of the cost: they replace vLLM's graph one step in N
        env["QUANTBRIDGE_PROFILE_FULL_EVERY"] = str(full_every)
    port = _free_port()
    # QB_SERVE_QUANTIZATION="" lets vLLM pick from the checkpoint's config (gptq_marlin for a GPTQ one).
    quant = os.environ.get("QB_SERVE_QUANTIZATION", "quantbridge")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint,
           *(["--quantization", quant] if quant else []), "--host", "127.0.0.1", "--port", str(port), "--dtype", os.environ.get("QB_SERVE_DTYPE", "float16"),
           "--max-model-len", "1024", "--max-num-seqs", str(max(CONCURRENCY, 1)), "--no-enable-prefix-caching",
           "--seed", "0", "--gpu-memory-utilization", os.environ.get("QB_SERVE_GPU_MEM", "0.5"), *extra]
    n = 0
    name = ("on" if full_every is None else f"on-every{full_every}") if profile else "off"
    while (log_path := out_dir / f"serve-{name}{f'-{n}' if n else ''}.log").exists():
        n += 1
    row: dict = {"profile": profile, "cmd": cmd, "log": log_path.name}
    if full_every is not None:
        row["full_every"] = full_every
    t_start = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + float(os.environ.get("QB_SERVE_TIMEOUT", "420"))
            while True:
                if server.poll() is not None:
                    row["error"] = f"vllm serve exited with {server.returncode} (see {log_path.name})"
                    return row
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline:
                        row["error"] = "vllm serve did not become healthy in time"
                        return row
                    time.sleep(1)
            row["startup_s"] = time.perf_counter() - t_start
            _round(base, checkpoint, PROMPTS)  # warm-up
            row["tokens_per_s"] = [_round(base, checkpoint, PROMPTS) for _ in range(rounds)]
            row["tokens_per_s_single"] = [_round(base, checkpoint, PROMPTS[:1]) for _ in range(rounds)]
            time.sleep(0.5)  # the profiler's idle flush (quantbridge/vllm/profiler.py IDLE_S)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    return row


def _stop_on_term(signum, frame) -> None:
    # `timeout` (a call's time limit) sends SIGTERM: leave through the `finally` that stops the server,
    # which runs in its own session and would otherwise outlive this script holding GPU memory.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop_on_term)
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    checkpoint, out_dir = args[0], Path(args[1])
    rounds = int(args[2]) if len(args) > 2 else 3
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = out_dir / "serve.json"
    rows = json.loads(earlier.read_text())["rows"] if earlier.exists() else []
    for which in filter(None, os.environ.get("QB_SERVE_ORDER", "off,on").split(",")):
        setting, _, every = which.partition("@")
        if setting not in ("off", "on") or (every and (setting == "off" or not every.isdigit())):
            raise SystemExit(f"QB_SERVE_ORDER: {which!r} is not off, on or on@N")
        row = one_server(checkpoint, out_dir, setting == "on", rounds, extra, int(every) if every else None)
        row["finished"] = time.strftime("%H:%M:%S")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "cmd"}), flush=True)
        _write(checkpoint, out_dir, rounds, extra, rows)  # a later server that never returns loses nothing


def _write(checkpoint: str, out_dir: Path, rounds: int, extra: list[str], rows: list[dict]) -> None:
    result = {"checkpoint": checkpoint, "prompts": len(PROMPTS), "max_tokens": MAX_TOKENS, "rounds": rounds,
              "extra_args": extra, "rows": rows,
              "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "QUANTBRIDGE_", "QB_"))}}
    # Every round of every server with the same setting pooled: rounds are short (a second or so).
    def rounds_of(flag: bool, key: str, every: int | None = None) -> list[float]:
        return [t for r in rows if r["profile"] == flag and r.get("full_every") == every for t in r.get(key, [])]
    pooled = {flag: rounds_of(flag, "tokens_per_s") for flag in (False, True)}
    single = {flag: rounds_of(flag, "tokens_per_s_single") for flag in (False, True)}
    # profiled servers whose FULL graphs' twins ran one step in N (N past the run's steps: never), against
    # the unprofiled ones; in serve.json even without a plain profiled server to compare with
    off = statistics.median(pooled[False]) if pooled[False] else None
    by_every = {}
    for every in sorted({r["full_every"] for r in rows if "full_every" in r}):
        got = rounds_of(True, "tokens_per_s", every)
        if got and off:
            t = statistics.median(got)
            by_every[str(every)] = {"tokens_per_s": t, "rounds": len(got), "change_pct": (t / off - 1) * 100,
                                    "single": statistics.median(rounds_of(True, "tokens_per_s_single", every))}
    if by_every:
        result["by_full_every"] = by_every
    if pooled[True] and off:
        on = statistics.median(pooled[True])
        servers = {flag: sum(1 for r in rows if r["profile"] == flag and r.get("tokens_per_s") and "full_every" not in r)
                   for flag in (False, True)}
        result["overhead"] = {
            "tokens_per_s_off": off, "tokens_per_s_on": on, "change_pct": (on / off - 1) * 100,
            "single_off": statistics.median(single[False]), "single_on": statistics.median(single[True]),
            "rounds_off": len(pooled[False]), "rounds_on": len(pooled[True]),
            "source": f"benchmarks/vllm_serve_gpu.py, {len(PROMPTS)} concurrent completions x {MAX_TOKENS} tokens, "
                      f"median of {len(pooled[False])} rounds over {servers[False]} unprofiled server(s) and "
                      f"{len(pooled[True])} over {servers[True]} profiled, CUDA graphs "
                      f"{'off' if '--enforce-eager' in extra else 'on'}"}
        if by_every:
            result["overhead"]["by_full_every"] = by_every
        (out_dir / "profile").mkdir(exist_ok=True)
        (out_dir / "profile" / "overhead.json").write_text(json.dumps(result["overhead"], indent=1))
    tmp = out_dir / ".serve.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "serve.json")


if __name__ == "__main__":
    main()

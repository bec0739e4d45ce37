"""`vllm serve` with `--quantization quantbridge` on a GPU, CUDA graphs on: profiling off vs on.

QB_SERVE_ORDER lists servers: "," runs them one after another, "+" holds them together. Each
server (QUANTBRIDGE_PROFILE_DIR set when profiled; vLLM's defaults: torch.compile and CUDA graphs,
no --enforce-eager) is started, waited for on /health, sent one warm-up round, then ROUNDS timed
rounds of the same fixed set of concurrent completions (PROMPTS, greedy, MAX_TOKENS each,
ignore_eos) and QB_SERVE_SINGLE_ROUNDS timed single-request rounds (decode at M=1). Servers held
together are started one at a time (vLLM's start-up measures free GPU memory) and take turns
round by round, the order rotating each cycle, so a drift of the machine falls on all of them
alike and each cycle pairs their rounds: the overhead is the median of the per-cycle ratios, not
of two medians taken minutes apart. A second unprofiled server in a group ("off+on+off") is a
control: its per-cycle change against the first is what the harness reads where nothing differs.
A pause of QB_SERVE_GAP_S before every round lets the profiler's idle flush
(quantbridge/vllm/profiler.py IDLE_S) finish outside the timed rounds; its cost is reported apart
(serve-stats' "profile flushes"). Writes OUT_DIR/serve.json, the profiled servers' worker files
and overhead.json (which `quantbridge serve-stats` shows) and the servers' logs. A serve.json
already in OUT_DIR keeps its rows: servers started by separate calls pool.

usage: python benchmarks/vllm_serve_gpu.py CHECKPOINT OUT_DIR [ROUNDS] [-- extra vllm serve args]
env: QB_SERVE_ORDER (default "off,on"; "off+on+on@1000000": three servers held together; "on@N":
     profiled with the FULL graphs' probed twins one step in N, its own profile directory, reported
     apart: N past the run's steps isolates the twins' cost), QB_SERVE_QUANTIZATION (quantbridge;
     empty: vLLM's own choice), QB_SERVE_DTYPE (float16), QB_SERVE_CONCURRENCY (16),
     QB_SERVE_MAX_TOKENS (128), QB_SERVE_TIMEOUT (health wait, s; 420), QB_SERVE_GAP_S (0.3),
     QB_SERVE_SINGLE_ROUNDS (single-request rounds; ROUNDS),
     QB_SERVE_GPU_MEM (each server's --gpu-memory-utilization; 0.5, or 0.8 / servers held together)
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
from dataclasses import dataclass
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


GAP_S = float(os.environ.get("QB_SERVE_GAP_S", "0.3"))


@dataclass
class Server:
    row: dict
    proc: subprocess.Popen | None = None
    base: str = ""


def _spec(which: str) -> tuple[bool, int | None]:
    setting, _, every = which.partition("@")
    if setting not in ("off", "on") or (every and (setting == "off" or not every.isdigit())):
        raise SystemExit(f"QB_SERVE_ORDER: {which!r} is not off, on or on@N")
    return setting == "on", int(every) if every else None


def start(checkpoint: str, out_dir: Path, profile: bool, extra: list[str], full_every: int | None,
          gpu_mem: str) -> Server:
    """One `vllm serve`, returned once /health answers (or with row["error"] set)."""
    env = {k: v for k, v in os.environ.items() if k != "QUANTBRIDGE_PROFILE_DIR"}
    if profile:
        env["QUANTBRIDGE_PROFILE_DIR"] = str(out_dir / ("profile" if full_every is None else f"profile-every{full_every}"))
    if full_every is not None:  # the probed twins' share of the cost: they replace vLLM's graph one step in N
        env["QUANTBRIDGE_PROFILE_FULL_EVERY"] = str(full_every)
    port = _free_port()
    # QB_SERVE_QUANTIZATION="" lets vLLM pick from the checkpoint's config (gptq_marlin for a GPTQ one).
    quant = os.environ.get("QB_SERVE_QUANTIZATION", "quantbridge")
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", checkpoint,
           *(["--quantization", quant] if quant else []), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", os.environ.get("QB_SERVE_DTYPE", "float16"),
           "--max-model-len", "1024", "--max-num-seqs", str(max(CONCURRENCY, 1)), "--no-enable-prefix-caching",
           "--seed", "0", "--gpu-memory-utilization", gpu_mem, *extra]
    n = 0
    name = ("on" if full_every is None else f"on-every{full_every}") if profile else "off"
    while (log_path := out_dir / f"serve-{name}{f'-{n}' if n else ''}.log").exists():
        n += 1
    row: dict = {"profile": profile, "cmd": cmd, "log": log_path.name, "tokens_per_s": [], "tokens_per_s_single": []}
    if full_every is not None:
        row["full_every"] = full_every
    t_start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(row, proc, f"http://127.0.0.1:{port}")
    deadline = time.time() + float(os.environ.get("QB_SERVE_TIMEOUT", "420"))
    while True:
        if proc.poll() is not None:
            row["error"] = f"vllm serve exited with {proc.returncode} (see {log_path.name})"
            return server
        try:
            urllib.request.urlopen(server.base + "/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                row["error"] = "vllm serve did not become healthy in time"
                return server
            time.sleep(1)
    row["startup_s"] = time.perf_counter() - t_start
    return server


def stop(server: Server) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def run_group(checkpoint: str, out_dir: Path, specs: list[tuple[bool, int | None]], rounds: int,
              extra: list[str], group: int) -> list[dict]:
    """Servers held together, taking turns round by round; their rows, cycle i at index i."""
    gpu_mem = os.environ.get("QB_SERVE_GPU_MEM") or ("0.5" if len(specs) == 1 else f"{0.8 / len(specs):.2f}")
    servers: list[Server] = []
    try:
        for profile, every in specs:
            servers.append(start(checkpoint, out_dir, profile, extra, every, gpu_mem))
            servers[-1].row["group"] = group
            if "error" in servers[-1].row:
                break
        live = [s for s in servers if "error" not in s.row]
        if len(live) < len(specs):  # turns need every server of the group: none is timed alone
            for s in live:
                s.row["error"] = "not timed: another server held with it did not start"
        else:
            for s in live:
                _round(s.base, checkpoint, PROMPTS)  # warm-up
            single = int(os.environ.get("QB_SERVE_SINGLE_ROUNDS", rounds))
            for prompts, key, n in ((PROMPTS, "tokens_per_s", rounds), (PROMPTS[:1], "tokens_per_s_single", single)):
                for i in range(n):
                    for s in live[i % len(live):] + live[:i % len(live)]:
                        time.sleep(GAP_S)
                        s.row[key].append(_round(s.base, checkpoint, prompts))
            time.sleep(0.5)  # the profiler's idle flush (quantbridge/vllm/profiler.py IDLE_S)
    finally:
        for s in servers:
            stop(s)
    return [s.row for s in servers]


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
    first = max((r.get("group", -1) for r in rows), default=-1) + 1
    for group, spec in enumerate(filter(None, os.environ.get("QB_SERVE_ORDER", "off,on").split(","))):
        specs = [_spec(which) for which in spec.split("+")]
        for row in run_group(checkpoint, out_dir, specs, rounds, extra, first + group):
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
    for every in by_every_keys(rows):
        got = rounds_of(True, "tokens_per_s", every)
        if got and off:
            t = statistics.median(got)
            by_every[str(every)] = {"tokens_per_s": t, "rounds": len(got), "change_pct": (t / off - 1) * 100,
                                    "single": statistics.median(rounds_of(True, "tokens_per_s_single", every))}
    paired = {key: _paired(rows, every) for key, every in (("on", None), *((str(e), e) for e in by_every_keys(rows)))}
    paired["control"] = _paired(rows, None, control=True)
    paired = {k: v for k, v in paired.items() if v}
    for every, e in by_every.items():
        if every in paired:
            e["paired"] = paired[every]
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
        if "on" in paired:
            result["overhead"]["paired"] = paired["on"]
        if "control" in paired:
            result["overhead"]["paired_control"] = paired["control"]
        if by_every:
            result["overhead"]["by_full_every"] = by_every
        (out_dir / "profile").mkdir(exist_ok=True)
        (out_dir / "profile" / "overhead.json").write_text(json.dumps(result["overhead"], indent=1))
    tmp = out_dir / ".serve.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "serve.json")


def by_every_keys(rows: list[dict]) -> list[int]:
    return sorted({r["full_every"] for r in rows if "full_every" in r})


def _paired(rows: list[dict], every: int | None, control: bool = False) -> dict | None:
    """Profiled against unprofiled rounds of servers held together, cycle by cycle: the median and
    quartiles of the per-cycle change in %, concurrent and single-request rounds apart. The first
    unprofiled server of a group is the reference; `control`: the group's other unprofiled
    servers against it instead (an A/A pair: what the harness reads where nothing differs)."""
    out = {}
    for key in ("tokens_per_s", "tokens_per_s_single"):
        change = []
        for g in {r["group"] for r in rows if "group" in r}:
            offs = [r for r in rows if r.get("group") == g and not r["profile"]]
            ons = offs[1:] if control else \
                [r for r in rows if r.get("group") == g and r["profile"] and r.get("full_every") == every]
            for a in offs[:1]:
                for b in ons:
                    change += [(y / x - 1) * 100 for x, y in zip(a.get(key, []), b.get(key, []))]
        if len(change) >= 4:
            q1, med, q3 = statistics.quantiles(change, n=4)
            out["single" if key.endswith("single") else "concurrent"] = {
                "change_pct": statistics.median(change), "q1_pct": q1, "q3_pct": q3, "cycles": len(change)}
    return out or None


if __name__ == "__main__":
    main()

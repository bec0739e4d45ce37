"""Runs inside the vLLM environment (see tests/test_vllm.py): offline generation and `vllm serve`
on a quantbridge checkpoint, with per-layer profiling; writes what it saw as JSON.

usage: python tests/vllm_e2e.py offline|serve CHECKPOINT PROFILE_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["The quick brown fox", "def f(x):", "In the beginning there was", "class Parser:"]
MAX_TOKENS = 12
ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=4, seed=0, enforce_eager=True,
              enable_prefix_caching=False)  # prefix caching would skip prompt tokens the profiler then never sees


def offline(checkpoint: str, out: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=checkpoint, quantization="quantbridge", **ENGINE)
    res = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    out["requests"] = [{"prompt_ids": list(r.prompt_token_ids), "output_ids": list(r.outputs[0].token_ids)}
                       for r in res]
    llm.llm_engine.engine_core.shutdown()  # workers exit and write their final profile
    del llm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkpoint: str, out: dict) -> None:
    port = _free_port()
    vllm = str(Path(sys.executable).parent / "vllm")  # the environment's own `vllm` command
    cmd = [vllm, "serve", checkpoint, "--quantization", "quantbridge",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", ENGINE["dtype"], "--max-model-len", "256",
           "--max-num-seqs", "4", "--enforce-eager", "--no-enable-prefix-caching", "--seed", "0"]
    log = open(os.environ.get("QB_SERVE_LOG", os.devnull), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}")
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("vllm serve did not become healthy in 400 s") from None
                time.sleep(1)

        def complete(prompt: str) -> dict:
            body = json.dumps({"model": checkpoint, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                               "ignore_eos": True, "return_token_ids": True}).encode()
            req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent requests: batched steps
            replies = list(pool.map(complete, PROMPTS))
        out["requests"] = [{"prompt_tokens": r["usage"]["prompt_tokens"],
                            "completion_tokens": r["usage"]["completion_tokens"],
                            "output_ids": r["choices"][0].get("token_ids")} for r in replies]
        out["profile_settled_s"] = _settle(sum(r["prompt_tokens"] + r["completion_tokens"] - 1
                                               for r in out["requests"]))
    finally:
        server.send_signal(signal.SIGINT)  # a normal shutdown: workers flush their profile at exit
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
        out["server_exit"] = server.returncode


def _settle(expected_tokens: int, timeout: float = 10.0) -> float | None:
    """Seconds until the worker files hold every served token (None: never, within timeout)."""
    from quantbridge.vllm.stats import load_workers, merge, tokens

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if set(tokens(merge(load_workers(os.environ["QUANTBRIDGE_PROFILE_DIR"]))).values()) == {expected_tokens}:
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - no file yet
            pass
        time.sleep(0.01)
    return None


def main() -> None:
    mode, checkpoint, profile_dir, out_path = sys.argv[1:5]
    os.environ["QUANTBRIDGE_PROFILE_DIR"] = profile_dir
    out: dict = {"mode": mode}
    (offline if mode == "offline" else serve)(checkpoint, out)
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()

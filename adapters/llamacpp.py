"""llama.cpp: the GGUF file run by llama.cpp itself (llama-cpp-python), as one whole-model row.

The row runs the same GGUF file the model came from (`demo`, `demo-gguf`, a `.gguf` MODEL)
on the same held-out token ids as every other row, and reports what llama.cpp can be asked
from Python: perplexity (its logits for every position, the same next-token loss the other
rows average), decode tokens/s at M = 1 (one token evaluated after a prefix, per timed run),
prefill latency (the prefill length from an empty cache) and the process's memory. Per-layer
figures are not available: llama.cpp runs the whole model in one call, so the row has none
and says so; decode at M > 1 needs llama.cpp's batched server API, which this row does not use.

llama-cpp-python 0.3.36 builds llama.cpp from source when installed. Built for this machine's
CPU (GGML_NATIVE), its AMX/AVX-512 code segfaulted on the first evaluation in the VM this
project's CI runs in, so the project installs it with a portable AVX2 build (.ci/setup, and
INSTALL_HINT). It runs on the CPU with as many threads as torch uses.
"""

from __future__ import annotations

import time
from importlib.util import find_spec

import numpy as np
import torch

from quantbridge.formats.gguf import open_gguf
from quantbridge.plugin.availability import Availability, dist_version
from quantbridge.plugin.backend import Engine, EngineFigures, EngineRun, register
from quantbridge.plugin.errors import NotRunnable, RowFailed

INSTALL_HINT = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF '
                '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36')
PER_LAYER = "not available: llama.cpp runs the whole model in one call"


def _version() -> str | None:
    return dist_version("llama-cpp-python")


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over positions, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return float((lse - z[np.arange(len(targets)), targets]).sum())


@register
class LlamaCppBackend(Engine):
    name = "llama.cpp"
    description = "the model's GGUF file through llama.cpp itself (llama-cpp-python, CPU): whole-model figures"
    install_hint = INSTALL_HINT

    def available(self, device: torch.device) -> Availability:
        v = _version()
        if v is None or find_spec("llama_cpp") is None:
            return Availability(False, "llama-cpp-python is not installed (its install compiles llama.cpp: minutes)")
        if device.type != "cpu":
            return Availability(False, f"llama-cpp-python {v} is installed as a CPU build here; compare with "
                                       "--device cpu (a CUDA build of llama.cpp is not wired in)")
        return Availability(True, f"llama-cpp-python {v} (CPU)")

    def measure(self, run: EngineRun) -> EngineFigures:
        from llama_cpp import Llama

        src = run.model_file
        if src is None:
            raise NotRunnable("llama.cpp runs a GGUF file; this model did not come from one (compare demo, "
                              "demo-gguf or a .gguf file)")
        kinds = sorted({t.tensor_type.name for t in open_gguf(src).tensors})  # a damaged file is named first
        ids = run.eval_ids.cpu().numpy()
        ctx = max(ids.shape[1], run.prefill or 0) + run.runs + run.warmup + 8
        threads = torch.get_num_threads()
        llm = Llama(model_path=str(src), n_ctx=ctx, n_batch=min(512, ctx), logits_all=True, verbose=False,
                    n_threads=threads, n_threads_batch=threads)
        nll, count = 0.0, 0
        for seq in ids:  # the reference's loss: next-token NLL averaged over every position
            llm.reset()
            llm.eval(seq.tolist())
            logits = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
            nll += _log_softmax_nll(logits[:-1], seq[1:])
            count += len(seq) - 1
        loss = nll / count
        flat = ids.reshape(-1).tolist()
        if len(flat) < 16 + run.warmup + run.runs:
            raise RowFailed(f"the evaluation text has {len(flat)} tokens, fewer than the 16-token prefix plus "
                            f"{run.warmup + run.runs} timed decode steps; use a longer --eval-text or fewer --runs")
        # decode, M = 1: each timed run evaluates one more token after a 16-token prefix
        llm.reset()
        llm.eval(flat[:16])
        us = []
        for i in range(run.warmup + run.runs):
            t0 = time.perf_counter_ns()
            llm.eval([flat[16 + i]])
            us.append((time.perf_counter_ns() - t0) / 1e3)
        decode_us = us[run.warmup:]
        prefill_us: list[float] = []
        if run.prefill:
            prompt = (flat * (run.prefill // len(flat) + 1))[: run.prefill]
            us = []
            for _ in range(min(run.runs, 5) + 1):
                llm.reset()
                t0 = time.perf_counter_ns()
                llm.eval(prompt)
                us.append((time.perf_counter_ns() - t0) / 1e3)
            prefill_us = us[1:]
        return EngineFigures(
            kernel=f"llama.cpp (llama-cpp-python {_version()}, CPU)", weights=f"gguf file ({', '.join(kinds)})",
            timing="llama.cpp (CPU, synchronous)", weight_bytes=src.stat().st_size, eval_loss=loss,
            decode_us=decode_us, prefill_us=prefill_us,
            notes={"per_layer": PER_LAYER, "engine": f"llama.cpp through llama-cpp-python {_version()}",
                   "threads": threads, "weight_bytes_counts": "the whole GGUF file, as llama.cpp loads it"},
            not_measured={m: "llama-cpp-python's Llama decodes one sequence" for m in sorted(set(run.batches)) if m != 1})

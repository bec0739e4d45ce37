"""An engine's row (llama.cpp runs the whole model itself): its plain figures made into a row."""

from __future__ import annotations

import math

from quantbridge.measure.metrics import summarize
from quantbridge.models.gguf import gguf_source
from quantbridge.plugin.backend import Engine, EngineRun
from quantbridge.results.schema import BackendResult
from quantbridge.run.reference import Reference
from quantbridge.run.settings import Steps


def engine_row(name: str, engine: Engine, model, ref: Reference, steps: Steps) -> BackendResult:
    """Run `engine` on the file `model` came from, scored on the reference's held-out ids.

    Raises what the engine raises: NotRunnable (the row is unavailable), RowFailed (failed)."""
    f = engine.measure(EngineRun(model_file=gguf_source(model), eval_ids=ref.eval_ids, reference_loss=ref.loss,
                                 batches=list(steps.batches), prefill=steps.prefill, runs=steps.runs,
                                 warmup=steps.warmup))
    metrics: dict = {"eval_loss": f.eval_loss, "eval_ppl": math.exp(f.eval_loss),
                     "eval_ppl_reference": math.exp(ref.loss), **f.notes,
                     "forward_us": {}, "tokens_per_s": {}, "timing": {}}
    step = summarize(f.decode_us)
    metrics["forward_us"]["1"] = step.to_dict()
    metrics["tokens_per_s"]["1"] = 1e6 / step.median
    metrics["timing"]["1"] = f.timing
    metrics["decode_tokens_per_s"] = {"1": 1e6 / step.median}
    if f.not_measured:
        metrics["decode_not_measured"] = {str(m): why for m, why in f.not_measured.items()}
    if f.prefill_us:
        pre, key = summarize(f.prefill_us), str(steps.prefill)
        metrics["forward_us"][key] = pre.to_dict()
        metrics["tokens_per_s"][key] = steps.prefill * 1e6 / pre.median
        metrics["timing"][key] = f.timing
        metrics["prefill_latency_us"] = pre.median
    return BackendResult(name=name, status="ok", kernel=f.kernel, weights=f.weights, timing=f.timing,
                         weight_bytes=f.weight_bytes, model_metrics=metrics)

"""Merge the per-worker profile files a vLLM server wrote into one comparison (results schema).

Each worker file (quantbridge/vllm/profiler.py) holds cumulative stats per (layer, M).
Tensor-parallel ranks time their own shard of every layer on every step: latency samples
are pooled across ranks, while the step count is rank 0's (each step is one call per layer
on every rank), and per-rank counts must agree.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from quantbridge.plugin.errors import UserError
from quantbridge.results.schema import BackendResult, Comparison, LayerRecord

SOURCE = "vllm serve"  # settings.source of a merged results file: how serve-stats knows its own


def load_workers(directory: str | Path, warn=None) -> list[dict]:
    """Every readable worker-*.json in `directory`; a bad one is skipped and named through `warn`."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{directory} is not a directory; pass the QUANTBRIDGE_PROFILE_DIR the server wrote to")
    files = sorted(d.glob("worker-*.json"))
    if not files:
        raise UserError(f"{directory} holds no worker-*.json; serve with QUANTBRIDGE_PROFILE_DIR={directory} set")
    workers, bad = [], []
    for f in files:
        try:
            w = json.loads(f.read_text(encoding="utf-8"))
            _check_worker(w)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            bad.append(f.name)
            if warn:
                warn(f"skipped {f}: {e}")
            continue
        workers.append(w)
    if not workers:
        raise UserError(f"no usable worker file in {directory} ({', '.join(bad)} could not be read); "
                        f"let the server run until it flushes its profile (QUANTBRIDGE_PROFILE_FLUSH_S)")
    return workers


# The fields merge() reads, with their types (profiler.py writes them). Every one is checked, so
# a worker file with a wrong type is skipped and named rather than ending the merge half-way.
_INT, _NUM, _STR = "an integer", "a number", "a string"
_WORKER_FIELDS = {"schema": _INT, "pid": _INT, "host": _STR, "backend": _STR, "model": _STR, "device": _STR,
                  "tp_rank": _INT, "tp_size": _INT, "flushes": _INT, "updated": _NUM}
_LAYER_FIELDS = {"kernel": _STR, "weight_bytes": _INT}
_STATS_FIELDS = {"count": _INT, "total_us": _NUM, "min_us": _NUM, "max_us": _NUM}


def _is(v, kind: str) -> bool:
    if isinstance(v, bool):  # JSON true/false are not counts
        return False
    return isinstance(v, int) if kind == _INT else isinstance(v, (int, float)) if kind == _NUM else isinstance(v, str)


def _check_fields(obj: dict, fields: dict[str, str], where: str) -> None:
    for key, kind in fields.items():
        if key in obj and not _is(obj[key], kind):
            raise ValueError(f"{where}{key} is {obj[key]!r}, not {kind}")
        if kind == _INT and key in obj and obj[key] < 0:
            raise ValueError(f"{where}{key} is {obj[key]}, below 0")


def _check_worker(w) -> None:
    """Raise ValueError unless every field merge() reads has the type profiler.py writes."""
    if not isinstance(w, dict):
        raise ValueError(f"a JSON {type(w).__name__}, not a worker profile object")
    layers = w.get("layers")
    if not isinstance(layers, dict):
        raise ValueError("no per-layer profile in it ('layers' is missing)")
    _check_fields(w, _WORKER_FIELDS, "")
    warmup = w.get("warmup_calls", {})
    if not isinstance(warmup, dict) or not all(_is(v, _INT) for v in warmup.values()):
        raise ValueError(f"warmup_calls is {warmup!r}, not an object of call counts")
    for name, info in layers.items():
        if not isinstance(info, dict) or not isinstance(info.get("m"), dict):
            raise ValueError(f"layer {name}: no per-M statistics")
        _check_fields(info, _LAYER_FIELDS, f"layer {name}: ")
        shape = info.get("shape", [])
        if not isinstance(shape, list) or not all(_is(v, _INT) for v in shape):
            raise ValueError(f"layer {name}: shape is {shape!r}, not a list of integers")
        for key in ("host_m", "graph_m"):
            if not isinstance(info.get(key, {}), dict):
                raise ValueError(f"layer {name}: {key} is not an object of per-M statistics")
        for m, acc in [*info["m"].items(), *info.get("host_m", {}).items(), *info.get("graph_m", {}).items()]:
            if not str(m).isdigit() or not isinstance(acc, dict):
                raise ValueError(f"layer {name} at M={m}: malformed statistics")
            _check_fields(acc, _STATS_FIELDS, f"layer {name} at M={m}: ")
            key, kind = ("samples_ns", _INT) if "samples_ns" in acc else ("samples_us", _NUM)  # schema 2, 1
            samples = acc.get(key)
            if not isinstance(samples, list) or not all(_is(v, kind) for v in samples):
                raise ValueError(f"layer {name} at M={m}: {key} is not a list of {kind.split()[-1]}s")
            if "count" not in acc or "total_us" not in acc:
                raise ValueError(f"layer {name} at M={m}: count or total_us is missing")


def _quantiles(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median": statistics.median(s), "p10": q[0], "p90": q[-1], "n": len(s)}


GRAPH = "graph"  # BackendResult.timing of the in-graph rows (backends[1] where graphs ran)


def _samples_us(acc: dict) -> list[float]:
    if "samples_ns" in acc:  # schema 2: integer nanoseconds
        return [v / 1e3 for v in acc["samples_ns"]]
    return list(acc["samples_us"])


def _pool(workers: list[dict], key: str, count_key: str = "count") -> dict[str, dict]:
    """layer -> {"info", "m": {M: samples, count0 (rank 0's `count_key`), total_us, reads}, "rank_counts"}."""
    layers: dict[str, dict] = {}
    for w in workers:
        rank = w.get("tp_rank", 0)
        for name, info in w["layers"].items():
            entry = layers.setdefault(name, {"info": info, "m": {}, "rank_counts": {}})
            for m, acc in info.get(key, {}).items():
                slot = entry["m"].setdefault(m, {"samples": [], "count0": 0, "total_us": 0.0, "reads": 0})
                slot["samples"] += _samples_us(acc)
                slot["total_us"] += acc["total_us"]
                slot["reads"] += acc["count"]
                n = acc.get(count_key, acc["count"])
                if rank == 0:
                    slot["count0"] += n
                entry["rank_counts"][rank] = entry["rank_counts"].get(rank, 0) + n
    return layers


def _latency(pooled: dict, graph: bool = False) -> dict:
    out = {}
    for m, s in sorted(pooled["m"].items(), key=lambda kv: int(kv[0])):
        if s["samples"]:
            out[m] = {**_quantiles(s["samples"]), "count": s["count0"], "total_us": s["total_us"]}
            if graph:
                out[m]["replays_read"] = s["reads"]
    return out


def merge(workers: list[dict]) -> Comparison:
    """backends[0]: eager calls (GPU time by CUDA events, host cost per call in host_us; on CPU the
    host clock); backends[1], where the server replayed CUDA graphs: GPU time per captured batch
    size read inside the graphs (count = replays, n = replays read)."""
    layers = _pool(workers, "m")
    host = _pool(workers, "host_m")
    graph = _pool(workers, "graph_m", "replays")
    records, graph_records = [], []
    for name, e in layers.items():
        info = e["info"]
        common = dict(name=name, shape=info.get("shape", []), quantized=True, kernel=info.get("kernel", ""),
                      weight_bytes=int(info.get("weight_bytes", 0)))
        records.append(LayerRecord(**common, latency_us=_latency(e), host_us=_latency(host[name]) if name in host else {}))
        if name in graph and graph[name]["m"]:
            graph_records.append(LayerRecord(**common, latency_us=_latency(graph[name], graph=True)))
    first = workers[0]
    backend = first.get("backend", "?")
    metrics = {"workers": len(workers), "warmup_calls": _sum_warmup(workers),
               "flushes": [w.get("flushes") for w in workers],
               "flush_ms": [w.get("flush_ms") for w in workers if isinstance(w.get("flush_ms"), dict)],
               "calls_per_rank": {n: e["rank_counts"] for n, e in layers.items()}}
    result = BackendResult(name=f"vllm:{backend}", status="ok", kernel=records[0].kernel if records else None,
                           weights="checkpoint", timing="eager", weight_bytes=sum(r.weight_bytes for r in records),
                           layers=records, model_metrics=metrics)
    backends = [result]
    if graph_records:
        backends.append(BackendResult(
            name=f"vllm:{backend} [graph]", status="ok", kernel=graph_records[0].kernel, weights="checkpoint",
            timing=GRAPH, weight_bytes=result.weight_bytes, layers=graph_records,
            model_metrics={"graphs": [g for w in workers for g in w.get("graphs", [])],
                           "replays_per_rank": {n: graph[n]["rank_counts"] for n in graph if graph[n]["m"]}}))
    ms = sorted({int(m) for b in backends for r in b.layers for m in r.latency_us})
    return Comparison(model={"name": first.get("model", "served model")},
                      device={"name": first.get("device", "?")},
                      settings={"source": SOURCE, "tp_size": first.get("tp_size", 1), "m_values": ms,
                                "decode_m": [], "prefill_m": [], "vllm": first.get("vllm"),
                                "cudagraph_mode": first.get("cudagraph_mode"),
                                "enforce_eager": first.get("enforce_eager")},
                      backends=backends)


def _sum_warmup(workers: list[dict]) -> dict:
    out: dict[str, int] = {}
    for w in workers:
        for n, c in w.get("warmup_calls", {}).items():
            out[n] = out.get(n, 0) + c
    return out


def steps(comp: Comparison) -> dict[str, int]:
    """Calls per layer summed over M (rank 0), eager calls and graph replays: the model steps each layer ran."""
    out: dict[str, int] = {}
    for b in comp.backends:
        for r in b.layers:
            out[r.name] = out.get(r.name, 0) + sum(v["count"] for v in r.latency_us.values())
    return out


def tokens(comp: Comparison) -> dict[str, int]:
    """Tokens per layer summed over steps (rank 0); a replayed graph counts its captured (padded) batch size."""
    out: dict[str, int] = {}
    for b in comp.backends:
        for r in b.layers:
            out[r.name] = out.get(r.name, 0) + sum(int(m) * v["count"] for m, v in r.latency_us.items())
    return out


def is_merge(path: Path) -> bool:
    """Whether `path` is a results file serve-stats wrote (a merge of worker profiles)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("settings"), dict) \
        and data["settings"].get("source") == SOURCE


OVERHEAD_FILE = "overhead.json"


def overhead(directory: str | Path) -> dict | None:
    """The profiling overhead benchmarks/vllm_profile_overhead.py measured for this profile directory
    (DIR/overhead.json: tokens/s of an unprofiled and a profiled server on the same prompts), or None."""
    f = Path(directory) / OVERHEAD_FILE
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        off, on = float(data["tokens_per_s_off"]), float(data["tokens_per_s_on"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = {"tokens_per_s_off": off, "tokens_per_s_on": on, "change_pct": (on / off - 1) * 100 if off else 0.0,
           "source": str(data.get("source", f))}
    # profiled servers with the FULL graphs' twins one step in N (benchmarks/vllm_serve_gpu.py "on@N")
    by_every, raw = {}, data.get("by_full_every")
    for every, e in (raw.items() if isinstance(raw, dict) else ()):
        try:
            t = float(e["tokens_per_s"])
            by_every[str(int(every))] = {"tokens_per_s": t, "change_pct": (t / off - 1) * 100 if off else 0.0,
                                         "rounds": int(e.get("rounds", 0))}
        except (ValueError, KeyError, TypeError):
            continue  # an entry this reader cannot use is left out, the rest still shown
        if paired := _paired(e.get("paired")):
            by_every[str(int(every))]["paired"] = paired
    if by_every:
        out["by_full_every"] = by_every
    for key in ("paired", "paired_control"):  # the control: a second unprofiled server against the first
        if paired := _paired(data.get(key)):
            out[key] = paired
    if resolved := _resolved(out.get("paired"), out.get("paired_control")):
        out["resolved"] = resolved
    return out


def _resolved(paired: dict | None, control: dict | None) -> dict[str, bool]:
    """Per load (concurrent, single), whether a held-together run resolves the profiled server's
    change: only where the A/A control reads as no change (its quartiles straddle zero and its
    median is under half the profiled server's)."""
    return {kind: c["q1_pct"] <= 0 <= c["q3_pct"] and abs(c["change_pct"]) < abs(p["change_pct"]) / 2
            for kind, p in (paired or {}).items() if (c := (control or {}).get(kind)) is not None}


def _paired(raw: object) -> dict | None:
    """Servers held together, rounds taking turns: per-cycle change in % (median, quartiles, cycles),
    concurrent and single-request rounds apart; what this reader cannot use is left out."""
    out = {}
    for kind, e in (raw.items() if isinstance(raw, dict) else ()):
        try:
            out[str(kind)] = {k: float(e[k]) for k in ("change_pct", "q1_pct", "q3_pct")} | {"cycles": int(e["cycles"])}
        except (ValueError, KeyError, TypeError):
            continue
    return out or None

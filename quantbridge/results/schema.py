"""The versioned result schema: LayerRecord -> BackendResult -> Comparison, and its files.

Reports and `plan` read results back from these files only. JSON cannot hold infinity,
so an exact match's SQNR (infinite) is written as null.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field

from quantbridge import __version__
from quantbridge.plugin.files import write_atomic

SCHEMA_VERSION = 3
# Version 1 had no host_us per layer and no timing per row: its latencies are eager, read as such.
# Versions 1 and 2 had no role per row: fp16 was the reference and "plan" the plan row.
READABLE_VERSIONS = (1, 2, 3)
STATUSES = ("ok", "failed", "unavailable")
ROLES = ("reference", "measured", "plan")  # what a row is to a report: the baseline, a row measured, a plan run


def _legacy_role(name: str) -> str:
    # Files written before rows carried a role named the reference "fp16" and the plan row "plan".
    return {"fp16": "reference", "plan": "plan"}.get(name, "measured")


@dataclass
class LayerRecord:
    name: str
    shape: list[int]  # [N, K] = [out_features, in_features]
    quantized: bool
    kernel: str
    weight_bytes: int
    latency_us: dict[str, dict] = field(default_factory=dict)  # str(M) -> {median, p10, p90, n}: GPU time in the row's mode
    host_us: dict[str, dict] = field(default_factory=dict)  # str(M) -> host enqueue cost per call (eager passes)
    error: dict[str, float | None] = field(default_factory=dict)  # rel_isolated, rel_propagated, sqnr_db, cosine


@dataclass
class BackendResult:
    name: str
    status: str
    reason: str | None = None
    kernel: str | None = None
    weights: str | None = None  # which algorithm made the weights ("rtn", "gptq", "gptq (shared)", ...)
    timing: str | None = None  # how latency was taken: "graph", "eager", "eager (not capturable: ...)", ...
    role: str = "measured"  # one of ROLES
    weight_bytes: int = 0
    bits_per_weight: float = 0.0
    layers: list[LayerRecord] = field(default_factory=list)
    model_metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not in {ROLES}")


@dataclass
class Comparison:
    model: dict
    device: dict
    settings: dict
    backends: list[BackendResult] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # plain-language conclusions computed from the numbers
    schema_version: int = SCHEMA_VERSION

    def backend(self, name: str) -> BackendResult | None:
        return next((b for b in self.backends if b.name == name), None)

    def reference(self) -> BackendResult | None:
        """The unquantized row every other row is measured against."""
        return next((b for b in self.backends if b.role == "reference"), None)

    def plan_row(self) -> BackendResult | None:
        return next((b for b in self.backends if b.role == "plan"), None)

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"results schema_version {version} is not one of {READABLE_VERSIONS}")
        backends = [
            BackendResult(**{**({"timing": "eager (schema v1)"} if version == 1 and b.get("layers") else {}),
                             "role": _legacy_role(b.get("name", "")), **b,
                             "layers": [LayerRecord(**layer) for layer in b.get("layers", [])]})
            for b in d.get("backends", [])
        ]
        return cls(model=d["model"], device=d["device"], settings=d["settings"], backends=backends,
                   findings=d.get("findings", []))


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def newer_schema(d: dict) -> str | None:
    """A one-line explanation when `d` was written with a schema newer than this quantbridge reads."""
    v = d.get("schema_version")
    if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION:
        return (f"results schema_version {v} was written by a newer quantbridge; this one ({__version__}) reads "
                f"up to {SCHEMA_VERSION}: upgrade quantbridge (pip install -U quantbridge)")
    return None


def check_loaded(comp: Comparison) -> Comparison:
    """Refuse loaded results whose numbers are not numbers (reports would fail half-way through)."""
    def number(v, where: str) -> None:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where} is {v!r}, not a number")

    for b in comp.backends:
        if not isinstance(b.layers, list) or not isinstance(b.model_metrics, dict):
            raise ValueError(f"backend {b.name!r}: layers must be a list and model_metrics an object")
        number(b.weight_bytes, f"backend {b.name!r} weight_bytes")
        number(b.bits_per_weight, f"backend {b.name!r} bits_per_weight")
        for r in b.layers:
            if not isinstance(r.latency_us, dict) or not isinstance(r.error, dict):
                raise ValueError(f"{b.name} layer {r.name}: latency_us and error must be objects")
            number(r.weight_bytes, f"{b.name} layer {r.name} weight_bytes")
            for m, stats in r.latency_us.items():
                if not isinstance(stats, dict):
                    raise ValueError(f"{b.name} layer {r.name} latency at M={m} is {stats!r}, not an object")
                for k, v in stats.items():
                    number(v, f"{b.name} layer {r.name} latency {k} at M={m}")
            for k, v in r.error.items():
                number(v, f"{b.name} layer {r.name} error {k}")
    return comp


def save_json(comp: Comparison, path: str | os.PathLike) -> None:
    write_atomic(path, json.dumps(comp.to_dict(), indent=1, allow_nan=False) + "\n")


def load_json(path: str | os.PathLike) -> Comparison:
    with open(path, encoding="utf-8") as f:
        return Comparison.from_dict(json.load(f))


CSV_ERRORS = ("rel_isolated", "rel_propagated", "sqnr_db", "cosine")


def to_csv(comp: Comparison) -> str:
    """One row per (backend, layer, M): flat, for spreadsheets and pandas."""
    ms = [str(m) for m in comp.settings.get("m_values", [])]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["backend", "status", "weights", "timing", "layer", "N", "K", "quantized", "kernel", "weight_bytes", "M",
                "latency_median_us", "latency_p10_us", "latency_p90_us", "host_median_us", *CSV_ERRORS])
    for b in comp.backends:
        if not b.layers:
            w.writerow([b.name, b.status, b.weights or "", b.timing or ""] + [""] * 15)
            continue
        for layer in b.layers:
            errs = [_csv_num(layer.error.get(e)) for e in CSV_ERRORS]
            for m in ms or [""]:
                lat = layer.latency_us.get(m, {})
                w.writerow([b.name, b.status, b.weights or "", b.timing or "", layer.name, *layer.shape, layer.quantized,
                            layer.kernel, layer.weight_bytes, m, _csv_num(lat.get("median")), _csv_num(lat.get("p10")),
                            _csv_num(lat.get("p90")), _csv_num(layer.host_us.get(m, {}).get("median")), *errs])
    return buf.getvalue()


def _csv_num(v) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def save_csv(comp: Comparison, path: str | os.PathLike) -> None:
    write_atomic(path, to_csv(comp))

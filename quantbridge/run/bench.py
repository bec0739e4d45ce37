"""Kernel benchmark: every backend's linear on real model shapes, against the memory roof.

For each (shape, M, backend): check the output against a float64 reference of the
backend's own dequantized weight, then time it (warm-up, median and p10/p90 of many
runs, CUDA events, a fresh random input per run, L2 flushed between runs). Achieved
bandwidth counts the bytes the layer must move (stored weight + x + y) and is compared
with a device-to-device copy measured in the same run.

Each backend's rows are a unit of work for the launcher (`bench_backend`). With isolation
"process" each backend runs in its own child process, all its shapes there: one that kills its
process (a signal, an illegal instruction) fails its remaining rows, naming the signal or exit
code, and the other backends are measured as usual. With "none" every backend runs here, shape
by shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
from torch import nn

from quantbridge.measure.graphs import time_replays
from quantbridge.measure.hardware import device_info
from quantbridge.measure.metrics import summarize
from quantbridge.measure.probes import L2Flush, time_calls
from quantbridge.plugin import backend as registry
from quantbridge.plugin import resolve
from quantbridge.plugin.backend import Engine
from quantbridge.plugin.errors import NoKernel, NotRunnable, UserError
from quantbridge.plugin.kernel import build_exactly, get_kernel
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.quantizer import baseline_label
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.launcher import Launcher, send
from quantbridge.run.rowspec import Kind, RowSpec, Shared

# (K, N) = (in_features, out_features) of each distinct linear shape.
SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
    "llama3-70b": [(8192, 8192), (8192, 28672), (28672, 8192)],
    "quick": [(512, 512), (1024, 256)],
}
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 512, 4096]
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Row:
    backend: str
    kernel: str
    k: int
    n: int
    m: int
    status: str  # ok | incorrect | failed | unavailable
    reason: str | None = None
    median_us: float | None = None
    p10_us: float | None = None
    p90_us: float | None = None
    bytes: int | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    speedup_vs_bf16: float | None = None
    check_rel_err: float | None = None
    timing: str | None = None  # "cuda-graph" (kernel time, no host overhead) or "eager"
    graph_launch_us: float | None = None  # a replay's time less the call's: not in median_us


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'llama3-8b,llama3-70b' or '4096x4096,8192x28672' (K x N) -> [(K, N), ...]."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part in SHAPE_SETS:
            out += SHAPE_SETS[part]
        elif "x" in part:
            try:
                k, n = (int(v) for v in part.split("x"))
            except ValueError:
                raise UserError(f"shape {part!r} is not KxN, e.g. 4096x14336") from None
            out.append((k, n))
            check_sizes([(k, n)], [1])
        else:
            raise UserError(f"unknown shape set {part!r}; use {', '.join(SHAPE_SETS)} or KxN")
    if not out:
        raise UserError(f"--shapes {text!r} names no shape; use {', '.join(SHAPE_SETS)} or KxN pairs, e.g. 4096x14336")
    return list(dict.fromkeys(out))


def check_sizes(shapes: list[tuple[int, int]], ms: list[int]) -> None:
    """Refuse a shape or M below 1: a [0, K] input has no error to check (NaN) and nothing to time."""
    for k, n in shapes:
        if k < 1 or n < 1:
            raise UserError(f"shape {k}x{n} has a dimension below 1; give KxN with K, N >= 1, e.g. 4096x14336")
    bad = [m for m in ms if m < 1]
    if bad:
        raise UserError(f"M={bad[0]} is not a positive batch size; give --batch values of at least 1, e.g. 1,16,128")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, runs: int = 20) -> dict:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    s = summarize(time_calls(lambda _: dst.copy_(src), range(runs), device))
    return {"bytes": 2 * nbytes, "median_us": s.median, "p10_us": s.p10, "p90_us": s.p90,
            "bytes_per_s": 2 * nbytes / (s.median * 1e-6)}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, runs: int = 10) -> float:
    """Measured dense matmul rate: the compute roof of the roofline plot."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    s = summarize(time_calls(lambda _: a @ b, range(runs), device))
    return 2 * size**3 / (s.median * 1e-6) / 1e12


def _check(q: nn.Module, k: int, m: int, device: torch.device, dtype: torch.dtype) -> float:
    x = torch.randn(min(m, 64), k, device=device, dtype=dtype)
    ref = x.double() @ q.dequantize().to(device).double().T
    out = q(x).double()
    if not torch.isfinite(out).all():
        return math.nan
    return ((out - ref).norm() / ref.norm()).item()


def bench_rows(names: list[str], kernels: list[str], device: torch.device) -> list[RowSpec]:
    """The reference first, then `names`, then each of `kernels` on its own (row `rtn+K`: the spec's
    round-to-nearest codes through exactly that kernel; a kernel's speed does not depend on how its
    codes were chosen, so this is how GPTQ and AWQ engine kernels are timed without calibrating)."""
    rows = [RowSpec(r.name, Kind.REFERENCE if r.obj.reference else Kind.ENGINE if isinstance(r.obj, Engine)
                    else Kind.BACKEND, backend=r.name) for r in resolve.backends(names, device)]
    rtn = Shared(baseline_label() or "rtn")
    return rows + [RowSpec.of_kernel(rtn, k) for k in kernels]


def _layer(row: RowSpec, lin: nn.Linear, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    """The row's layer for `lin`; NotRunnable when the row cannot hold one layer of this shape."""
    rtn = partial(quantize_rtn, lin.weight.detach(), spec, scale_dtype=dtype)
    if row.kind is Kind.KERNEL:
        return build_exactly(row.kernel, rtn(), None)
    if row.kind is Kind.ENGINE:
        raise NotRunnable("it runs a whole model file, not one layer")
    b = registry.get(row.backend)
    if b.whole_model and not b.needs_calibration:
        raise NotRunnable("its weights are read from a model's own file, which a bench shape does not have")
    if b.needs_calibration:
        # A kernel's speed does not depend on how its codes were chosen: time a calibrated
        # backend's layer (its own layout and kernel) on round-to-nearest codes.
        return b.from_int4(rtn(), None)
    return b.quantize(lin, spec)


def bench_layer(spec_row: RowSpec, k: int, n: int, ms: list[int], spec: QuantSpec, device: torch.device,
                dtype: torch.dtype, runs: int, warmup: int, flush: L2Flush, bw: float) -> list[Row]:
    torch.manual_seed(k * 7 + n)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    nn.init.normal_(lin.weight, std=0.02)
    rows = []
    name = spec_row.name
    try:
        q = _layer(spec_row, lin, spec, dtype)
    except (NotRunnable, NoKernel) as e:  # a limit of the kernels (device, dtype, shape), not a fault
        return [Row(name, "", k, n, m, "unavailable", str(e).splitlines()[0]) for m in ms]
    except (UserError, RuntimeError, TypeError, NotImplementedError, ImportError) as e:
        return [Row(name, "", k, n, m, "failed", f"{type(e).__name__}: {str(e).splitlines()[0]}")
                for m in ms]
    del lin
    with torch.inference_mode():
        for m in ms:
            row = Row(name, q.kernel, k, n, m, "ok")
            try:
                row.check_rel_err = _check(q, k, m, device, dtype)
                if not row.check_rel_err <= CHECK_TOL[dtype]:
                    row.status, row.reason = "incorrect", f"rel. error {row.check_rel_err:.3g} vs its own dequantized weight"
                xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(warmup + runs)]
                for x in xs[:warmup]:
                    q(x)  # tuning and compilation happen here, untimed
                # On CUDA captured once and replayed (as serving engines run decode): no host launch overhead.
                timed = time_replays(q, xs[warmup:], device, flush)
                s, row.timing = summarize(timed.samples), timed.timing
                if timed.launch_us:
                    row.graph_launch_us = summarize(timed.launch_us).median
            except torch.cuda.OutOfMemoryError:
                row.status, row.reason = "failed", "out of memory"
                rows.append(row)
                torch.cuda.empty_cache()
                continue
            row.median_us, row.p10_us, row.p90_us = s.median, s.p10, s.p90
            row.bytes = q.weight_nbytes + (m * k + m * n) * torch.finfo(dtype).bits // 8
            row.gbps = row.bytes / (s.median * 1e-6) / 1e9
            row.pct_copy_bw = 100 * row.bytes / (s.median * 1e-6) / bw
            rows.append(row)
    return rows


def run_bench(shapes: list[tuple[int, int]], ms: list[int], names: list[str], device: torch.device,
              dtype: torch.dtype, spec: QuantSpec, runs: int = 50, warmup: int = 5,
              progress: Callable[[str], None] | None = None,
              on_shape: Callable[[dict], None] | None = None, isolation: str = "none",
              kernels: list[str] = ()) -> dict:
    """Sweep shapes x (backends, then `kernels` on their own) x M; `on_shape` gets the partial
    result after every shape (with isolation "process": after every backend or kernel, whose
    child process ran all its shapes)."""
    launcher = Launcher.asked(isolation)
    check_sizes(shapes, ms)
    spec = spec.fitted({f"{k}x{n}": k for k, n in shapes})  # auto: the largest group dividing every K
    reference = registry.reference_name()  # the unquantized baseline every speedup is against
    rows = bench_rows(names, list(kernels), device)
    flush = L2Flush(device)
    copy = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    result = {
        "schema_version": 1,
        "device": device_info(device),
        "settings": {"dtype": str(dtype).removeprefix("torch."), "spec": spec.to_dict(), "runs": runs,
                     "warmup": warmup, "l2_flush": flush.setting, "m_values": ms, "reference": reference,
                     "bytes_counted": "stored weight (codes+scales+zeros) + x + y"},
        "copy_bandwidth": copy,
        "matmul_tflops": matmul_tflops(device, dtype, size=8192 if device.type == "cuda" else 512),
        "backends": {},
        "rows": [],
        "isolation": launcher.how,
    }
    for row in rows:
        r = resolve.kernel(row.kernel, device) if row.kind is Kind.KERNEL else resolve.backend(row.backend, device, spec)
        result["backends"][row.name] = {"available": r.ok, "reason": r.reason,
                                        **({"kernel": row.kernel} if row.kind is Kind.KERNEL else {})}
    del flush  # each unit has its own
    if launcher.isolated and device.type == "cuda":
        torch.cuda.empty_cache()  # nothing of ours stays on the GPU while the children run
    job = BenchJob(rows[0], shapes, ms, str(device), str(dtype).removeprefix("torch."), spec, runs, warmup,
                   copy["bytes_per_s"])
    _sweep(result, launcher, job, rows, progress, on_shape)
    return result


@dataclass(frozen=True)
class BenchJob:
    """One row's shapes, measured (in a child process, or in this one)."""

    row: RowSpec
    shapes: list[tuple[int, int]]
    ms: list[int]
    device: str
    dtype: str
    spec: QuantSpec
    runs: int
    warmup: int
    copy_bytes_per_s: float


def bench_backend(job: BenchJob) -> int:
    """A unit of work: every shape of `job` for one row; each shape's rows are sent as they finish."""
    device, dtype = torch.device(job.device), getattr(torch, job.dtype)
    flush = L2Flush(device)
    for k, n in job.shapes:
        send(("shape", k, n))
        rows = bench_layer(job.row, k, n, job.ms, job.spec, device, dtype, job.runs, job.warmup, flush, job.copy_bytes_per_s)
        send(("rows", [asdict(r) for r in rows]))
    return len(job.shapes)


def _sweep(result: dict, launcher: Launcher, job: BenchJob, specs: list[RowSpec],
           progress: Callable[[str], None] | None, on_shape: Callable[[dict], None] | None) -> None:
    """Every row at every shape of `job`, each row's through the launcher, in passes: here one
    shape at a time, every row at it; in child processes one row at a time, its process measuring
    every shape (one start per row). `on_shape` after every pass."""
    shapes, ms, names = job.shapes, job.ms, [s.name for s in specs]
    done: dict[tuple[str, int, int], list[dict]] = {}
    passes = ([[(row, shapes)] for row in specs] if launcher.isolated
              else [[(row, [shape]) for row in specs] for shape in shapes])
    for units in passes:
        for row, batch in units:
            name = row.name

            def forward(message, name=name) -> None:
                if message[0] == "shape" and progress:
                    progress(f"{name} {message[1]}x{message[2]}")
                elif message[0] == "rows":
                    first = message[1][0]
                    done[(name, first["k"], first["n"])] = message[1]

            info = result["backends"][name]
            if not info["available"]:
                for k, n in batch:
                    if not launcher.isolated:  # here every source is named at every shape; no child starts for it
                        forward(("shape", k, n))
                    done[(name, k, n)] = [asdict(Row(name, "", k, n, m, "unavailable", info["reason"])) for m in ms]
                continue
            unit = replace(job, row=row, shapes=batch)
            kernel = row.kernel
            out = launcher.run("quantbridge.run.bench:bench_backend", unit, backends=[row.backend] if row.backend else [],
                               imports=[type(get_kernel(kernel)).__module__] if kernel else [], on_message=forward)
            reason = out.failure()
            if reason is not None:
                for k, n in batch:
                    if (name, k, n) not in done:  # shapes finished before the process died are kept
                        done[(name, k, n)] = [asdict(Row(name, "", k, n, m, "failed", reason)) for m in ms]
        # shape-major, sources in order, whichever way the passes went
        result["rows"] = [r for k, n in shapes for name in names for r in done.get((name, k, n), [])]
        _speedups(result["rows"], result["settings"]["reference"])
        if on_shape:
            on_shape(result)


def _speedups(rows: list[dict], reference: str) -> None:
    base = {(r["k"], r["n"], r["m"]): r["median_us"] for r in rows if r["backend"] == reference and r["median_us"]}
    for r in rows:
        b = base.get((r["k"], r["n"], r["m"]))
        if b and r["median_us"]:
            r["speedup_vs_bf16"] = b / r["median_us"]


def failures(result: dict, named: set[str]) -> list[str]:
    """One line per bench row (a backend, or `rtn+K` for a kernel on its own) that did not measure
    what was asked, with the fix: rows that failed or were incorrect, and unavailable rows of
    backends and kernels the user named (not those of the default list that cannot run here)."""
    bad: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r["status"] in ("failed", "incorrect") or (r["status"] == "unavailable" and r["backend"] in named):
            bad.setdefault(r["backend"], []).append(r)
    out = []
    for name, rows in bad.items():
        total = sum(r["backend"] == name for r in result["rows"])
        r = rows[0]
        out.append(f"row {name} {r['status']} on {len(rows)} of {total} shape/M cases (first {r['k']}x{r['n']} "
                   f"M={r['m']}): {r['reason']}; fix: {_bench_fix(name, r, result.get('backends', {}).get(name, {}))}")
    return out


def _bench_fix(name: str, row: dict, info: dict) -> str:
    """What to do about row `name`. info: bench.json's entry for it (`available`: whether its library
    loaded here; `kernel`: the one kernel a kernel row runs)."""
    if row["status"] == "incorrect":
        return "its output disagrees with its own dequantized weight: a kernel defect; leave it out and report it"
    reason = row["reason"] or ""
    # A library that loaded but refuses a case (a dtype, a shape) needs no install: its reason says what it takes.
    missing = "ImportError" in reason or "ModuleNotFound" in reason or (
        row["status"] == "unavailable" and not info.get("available", True))
    hint = ""
    if missing:
        kernel = info.get("kernel")
        if kernel is not None:
            hint = get_kernel(kernel).install_hint
        elif name in registry.names():
            hint = registry.get(name).install_hint
    if hint:
        return f"install its library: {hint}"
    if row["status"] == "unavailable":
        return "leave it out of --backends/--kernels for these cases (the reason says what it takes)"
    return "rerun it alone (--backends/--kernels) with --isolation none to see where it fails"

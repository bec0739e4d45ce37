"""A comparison: one reference run, then one isolated row per backend, as result records.

    rows.py       where a row's layers come from (its own weights, a checkpoint's, --weights')
    reference.py  the inputs and the reference model's outputs, made once
    measure.py    one row: errors, per-layer timing per M in the row's mode, model metrics
    timing.py     the timing modes (graph, eager, compile) and their fallbacks
    launcher.py   a unit of work run here or in a spawned child process, and how a dead child is described
This module runs the rows in order, each through the launcher: a row's failure (exception,
NaN, out of memory) becomes its status and the others go on. With isolation "process" every
row runs in its own child process (`measure_one_row`): the reference is computed here once and
handed over in a file, the child loads the model again, and a child that dies (a signal, an
exit, a poisoned CUDA context) becomes that row's `failed` status.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch

from quantbridge.files import faults
from quantbridge.measure import machinecheck
from quantbridge.measure.hardware import device_info
from quantbridge.measure.probes import L2Flush
from quantbridge.measure.telemetry import Sampler
from quantbridge.models.checkpoint import spec_of
from quantbridge.models.gguf import model_codes
from quantbridge.models.load import load_model
from quantbridge.models.loaded import LoadedModel, ModelOrigin, fingerprint, linear_layers
from quantbridge.plugin import backend as registry
from quantbridge.plugin import resolve
from quantbridge.plugin.backend import Engine, Pairing
from quantbridge.plugin.errors import BackendUnavailable, NotRunnable, RowFailed, UserError
from quantbridge.plugin.kernel import choose, probe_weight
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.quantizer import baseline_label
from quantbridge.plugin.spec import QuantSpec
from quantbridge.results.plan import check_plan_layers
from quantbridge.results.schema import BackendResult, Comparison
from quantbridge.run import launcher as iso
from quantbridge.run.engine_row import engine_row
from quantbridge.run.launcher import ISOLATION, Launcher
from quantbridge.run.measure_row import measure_row, sensitivity
from quantbridge.run.preflight import skip_targets
from quantbridge.run.reference import SHIPPED_EVAL, Reference, make_inputs, nonfinite_parameter, run_reference
from quantbridge.run.rows import (Progress, WeightSource, kernel_layers, plan_layers, row_layers, shared_source,
                                  with_layers)
from quantbridge.run.rowspec import Kind, RowSpec, Shared
from quantbridge.run.settings import Settings, timing_mode

ROW = "quantbridge.run.compare:measure_one_row"  # a row's unit of work in its own process

__all__ = ["Settings", "run_comparison", "measure_one_row", "RowJob", "findings", "verdict", "with_layers",
           "ISOLATION"]


@dataclass(frozen=True)
class Rows:
    """The rows of one comparison and what they share, fixed before the first row runs."""

    specs: list[RowSpec]  # in order: the reference, the backends, the kernel rows, the plan
    targets: set[str]  # the layers a quantized row quantizes
    spec: QuantSpec  # the checkpoint's own, when MODEL is one
    shared: Shared | None  # the weights every row runs (a checkpoint's, a --weights backend's) or None
    unavailable: dict[str, str]  # row -> why it cannot run here (recorded, with --skip-unavailable)

    @property
    def backends(self) -> list[str]:
        """The backends the rows run, in order (the reference first)."""
        return [s.backend for s in self.specs if s.backend is not None]

    @property
    def reference(self) -> RowSpec:
        return self.specs[0]


def check_request(loaded: LoadedModel, names: list[str], settings: Settings, device: torch.device) -> Rows:
    """Check the request against the model and this machine; raise UserError before any work.

    Which rows can run is settled here, before the reference run and any calibration: each
    row's quantizer and kernels are here, and at least one of its kernels can run weights of
    the structure it will get (the spec's group size, act-order and zero-points, at every
    layer shape; a checkpoint's own weights). A row that cannot run stops the run with one
    line naming it and why, or with --skip-unavailable is recorded as `unavailable`.
    """

    linears = linear_layers(loaded.model)
    if not linears:
        raise UserError(f"model {loaded.name!r} has no nn.Linear layers to compare")
    fmt = (loaded.info.get("checkpoint") or {}).get("format", "") if loaded.int4 is not None else None
    shared = shared_source(fmt, settings.weights, device)
    if loaded.int4 is not None:  # a quantized checkpoint: its layers, its weights, every kernel
        targets, spec = set(loaded.int4), spec_of(loaded.int4)
    else:
        targets = set(skip_targets(linears, settings.skip, loaded.name))
        spec = settings.spec.fitted({n: linears[n].in_features for n in sorted(targets)})
    if settings.plan is not None:  # a plan applied in part would be measured as if whole
        check_plan_layers(settings.plan, linears, targets, loaded.name)
    # With shared weights only their quantizer runs, so only it must do the spec.
    resolved = resolve.backends(names, device, spec if shared is None else None)
    specs = [RowSpec(r.name, Kind.REFERENCE if r.obj.reference else Kind.ENGINE if isinstance(r.obj, Engine)
                     else Kind.BACKEND, backend=r.name) for r in resolved]
    unavailable = {}

    def cannot(row: str, reason: str, message: str | None = None) -> None:
        if not settings.skip_unavailable:
            raise BackendUnavailable(f"{message or f'row {row} cannot run here: {reason}'} (or pass "
                                     f"--skip-unavailable to record it as unavailable and run the other rows)")
        unavailable[row] = reason

    if shared is not None and not shared.from_checkpoint:
        resolve.require(resolve.backend(shared.backend, device, spec))
    probes = _Probes(loaded, sorted(targets), spec, device)
    for r in resolved:
        if not r.availability.ok:
            cannot(r.name, r.reason, r.message())
            continue
        resolve.require(r)  # a spec it cannot quantize to stops the run
        problem = _row_problem(r.obj, shared, probes)
        if problem:
            cannot(r.name, problem)
    if settings.kernels:
        if shared is None:
            raise UserError("--kernels runs one set of weights through several kernels: give --weights BACKEND "
                            "(e.g. --weights gptq) or compare a quantized checkpoint")
        for k in settings.kernels:
            row = RowSpec.of_kernel(shared, k)
            specs.append(row)
            r = resolve.kernel(k, device)
            if not r.ok:
                cannot(row.name, f"kernel {k}: {r.reason}", f"row {row.name}: {r.message()}")
                continue
            problem = _kernels_problem([k], f"kernel {k}", probes.weights(shared, None))
            if problem:
                cannot(row.name, problem)
    if settings.plan is not None:
        specs.append(RowSpec.plan())
    return Rows(specs, targets, spec, shared, unavailable)


class _Probes:
    """The weights each row will run, as far as they are known before any is made: a checkpoint's
    own, else weights of the spec's structure at each distinct layer shape (kernel.probe_weight).
    None where the quantizer reads its codes from the model's file (their structure is the file's)."""

    def __init__(self, loaded: LoadedModel, targets: list[str], spec: QuantSpec, device: torch.device) -> None:
        self.loaded, self.targets, self.spec, self.device = loaded, targets, spec, device
        self._made: dict[str, dict[str, Int4Weight] | None] = {}

    def weights(self, shared: Shared | None, backend: str | None) -> dict[str, Int4Weight] | None:
        """Layer -> weight for what a row runs: the shared weights, else `backend`'s own."""
        if shared is not None and shared.from_checkpoint:
            return {n: w.plain() if w.smoothed else w for n, w in self.loaded.int4.items()}
        source = backend if shared is None else shared.backend
        if source not in self._made:
            self._made[source] = self._make(source)
        return self._made[source]

    def _make(self, source: str) -> dict[str, Int4Weight] | None:
        b = registry.get(source)
        if not isinstance(b, Pairing) or b.reads_model:
            return None
        linears = linear_layers(self.loaded.model)
        shapes: dict[tuple, str] = {}  # one layer per distinct shape and dtype
        for n in self.targets:
            w = linears[n].weight
            shapes.setdefault((w.shape[0], w.shape[1], w.dtype), n)
        return {n: probe_weight(out, k, self.spec, dt, self.device) for (out, k, dt), n in shapes.items()}


def _row_problem(b: registry.Backend, shared: Shared | None, probes: _Probes) -> str | None:
    """Why backend `b`'s row cannot run the weights it will be given here, or None (also when unknown)."""
    if isinstance(b, Engine) and shared is not None and not shared.from_checkpoint:
        return f"{b.name} runs its own model file as a whole; it cannot run --weights {shared.backend}'s weights"
    if not b.quantized:
        return None
    if shared is not None and not b.runs_int4():
        return f"{b.name} cannot run {shared.name}'s INT4 weights (its own format only)"
    if not isinstance(b, Pairing):  # a fused backend: nothing to ask before it runs
        return None
    return _kernels_problem(b.kernels, f"no kernel of {b.name}", probes.weights(shared, b.name))


def _kernels_problem(kernels, who: str, weights: dict[str, Int4Weight] | None) -> str | None:
    """The first layer none of `kernels` can run (with every kernel's reason), or None."""
    for n, w in (weights or {}).items():
        c = choose(kernels, w, w.qweight.device, w.scales.dtype)
        if c.kernel is None:
            return f"{who} can run layer {n} ({w.out_features}×{w.in_features}): {c.why_not}"
    return None


def run_comparison(loaded: LoadedModel, names: list[str], settings: Settings, device: torch.device,
                   dtype: torch.dtype, progress: Progress | None = None,
                   on_result: Callable[[Comparison], None] | None = None, isolation: str = "none") -> Comparison:
    """Every row of `names` (plus the reference, and the plan if any) on `loaded`, in order.

    `isolation`: "process" runs each row in its own child process (see `measure_one_row`), "none"
    in this one. --debug, and a model built in memory (no `origin` to load it again from), run
    in this process; `settings["isolation"]` in the result says which happened and why.
    `on_result` sees the comparison after every row, so a caller can save what finished.
    """
    # The parent has already loaded (and downloaded) the model: a child never goes to the network.
    launcher = Launcher.asked(isolation, _runs_here_because(loaded, settings), env={"HF_HUB_OFFLINE": "1"})
    progress = progress or Progress()
    rows = check_request(loaded, names, settings, device)
    mode = timing_mode(settings.mode, device)
    linears = linear_layers(loaded.model)
    progress.begin("reference: the unquantized model on the inputs", 1)
    eval_ids, steps = make_inputs(loaded.tokenizer, settings.steps, settings.eval_text, settings.eval_seqs,
                                  settings.eval_len, settings.seed, device)
    ref = run_reference(loaded.model, linears, eval_ids, steps, settings.eval_text or SHIPPED_EVAL)
    progress.advance()
    flush = L2Flush(device)
    comp = Comparison(
        model=loaded.info,
        device=device_info(device),
        settings={**settings.to_dict(), "spec": rows.spec.to_dict(),
                  "group_size_auto": settings.spec.auto and loaded.int4 is None,
                  **({"calibration": dict(zip(("samples", "length", "chosen"), settings.calibration(device)))}
                     if _calibrates(rows, settings, loaded) else {}), "mode": mode, "device": str(device),
                  "dtype": str(dtype).removeprefix("torch."), "l2_flush": flush.setting, "eval_tokens": eval_ids.numel(),
                  "eval_source": ref.eval_source, "eval_context": settings.eval_len,
                  "decode_m": sorted(set(settings.batches)),
                  "prefill_m": [settings.prefill] if settings.prefill else [], "isolation": launcher.how},
    )
    bad_reference = nonfinite_parameter(loaded.model)

    def record(row: RowSpec, result: BackendResult) -> None:
        result.role = row.role
        comp.backends.append(result)
        comp.findings = findings(comp)
        if on_result:
            on_result(comp)

    def early(name: str) -> BackendResult | None:
        if bad_reference is not None:
            return BackendResult(name=name, status="failed",
                                 reason=f"the reference model itself is non-finite: {bad_reference} holds NaN or Inf")
        if name in rows.unavailable:
            return BackendResult(name=name, status="unavailable", reason=rows.unavailable[name])
        return None

    backends = _backend_names(rows, settings)
    calibrated: set[str] = set()  # algorithms whose weights an earlier row of this comparison cached
    with ExitStack() as stack:
        if launcher.isolated:  # a child process per row, made from a RowJob
            tmp = stack.enter_context(iso.private_dir("quantbridge-compare-"))
            job = RowJob(row=rows.reference, origin=loaded.origin, fingerprint=fingerprint(loaded.model), rows=rows,
                         settings=settings, mode=mode, reference_file=str(tmp / "reference.pt"), use_cache=settings.cache)
            try:
                iso.save(ref, job.reference_file)
            except OSError as e:  # TMPDIR full or `ulimit -f`: before any row, in one line
                where = f"the reference activations (in {faults.tmpdir_named()})"
                raise faults.WriteFailed(job.reference_file, e, where) from None
            del ref, flush  # what stays here is the model, parked off the GPU while the children run
            stack.enter_context(_parked(loaded, device))
            here = None
        else:  # every row in this process, on one weight source
            job = None
            source = _weight_source(loaded, rows, settings, device, dtype, progress)
            here = partial(_row, loaded=loaded, rows=rows, source=source, ref=ref, settings=settings, mode=mode,
                           device=device, dtype=dtype, flush=flush, progress=progress)
        for row in rows.specs:
            result = early(row.name)
            if result is None:
                needs = _calibrations(row, rows, settings)
                cached = settings.cache or bool(needs) and needs <= calibrated
                result = _launched_row(launcher, row, replace(job, row=row, use_cache=cached) if job else None,
                                       partial(here, row) if here else None, backends, progress)
                if result.status == "ok":  # a row that died may not have written the cache
                    calibrated |= needs
            record(row, result)
    return comp


@dataclass(frozen=True)
class RowJob:
    """What a row's child process is given: all picklable; the reference tensors are in `reference_file`."""

    row: RowSpec
    origin: ModelOrigin  # how to load the model again
    fingerprint: str  # the compared model's (loaded.fingerprint), checked after loading it again
    rows: Rows
    settings: Settings
    mode: str
    reference_file: str  # the Reference, written once by the parent (torch.save)
    use_cache: bool  # read calibrated weights from the on-disk cache (also when an earlier row just wrote them)

    @property
    def name(self) -> str:
        return self.row.name


def measure_one_row(job: RowJob) -> BackendResult:
    """One row in a child process: load the model again, read the reference, run `_row`.

    Progress goes to the parent through launcher.send; the result is returned (pickled).
    """

    start = time.monotonic()
    device, dtype = torch.device(job.origin.device), getattr(torch, job.origin.dtype)
    progress = _ForwardedProgress()
    progress.begin(f"{job.row.name}: loading {job.origin.spec} in the row's process", 1)
    loaded = load_model(job.origin.spec, device, dtype)
    if fingerprint(loaded.model) != job.fingerprint:
        return BackendResult(name=job.row.name, status="failed",
                             reason=f"{job.origin.spec} loaded again in the row's process differs from the compared "
                                    f"model (was it changed in memory after loading?); run with --isolation none")
    ref = iso.load(job.reference_file)
    ref = replace(ref, eval_ids=ref.eval_ids.to(device),
                  steps={m: [x.to(device) for x in xs] for m, xs in ref.steps.items()})
    progress.advance()
    faults.stage("compare-row-started")  # test hook: a signal while a row's process runs
    loaded_s = time.monotonic() - start
    source = _weight_source(loaded, job.rows, replace(job.settings, cache=job.use_cache), device, dtype, progress)
    result = _row(job.row, loaded, job.rows, source, ref, job.settings, job.mode, device, dtype, L2Flush(device),
                  progress)
    telemetry = result.model_metrics.get("telemetry")
    if telemetry:  # the peak is this row's alone: nothing else ran in its process
        telemetry["memory_kind"] += ", the row's own process"
    result.model_metrics["isolation"] = {"process": "own", "load_s": loaded_s,
                                         "row_s": time.monotonic() - start - loaded_s}
    return result


class _ForwardedProgress(Progress):
    """A child's progress, sent to the parent's Progress."""

    def begin(self, description: str, total: int) -> None:
        iso.send(("begin", description, total))

    def advance(self, n: int = 1) -> None:
        iso.send(("advance", n))


def _forward(progress: Progress, message) -> None:
    """A message of a row's _ForwardedProgress, to this process's Progress."""
    if message[0] == "begin":
        progress.begin(message[1], message[2])
    elif message[0] == "advance":
        progress.advance(message[1])


def _launched_row(launcher: Launcher, row: RowSpec, job: RowJob | None, here: Callable[[], BackendResult] | None,
                  backends: set[str], progress: Progress) -> BackendResult:
    """`row` through the launcher: `measure_one_row(job)` in its own process, or `here()` in this one."""
    if launcher.isolated:
        progress.begin(f"{row.name}: starting the row's process", 1)
    out = launcher.run(ROW, job, here=here, backends=backends, on_message=partial(_forward, progress))
    reason = out.failure(outside="the row's own error handling")
    if reason is not None:  # its process raised past _row, died (a signal, an exit) or timed out
        return BackendResult(name=row.name, status="failed", reason=reason)
    if launcher.isolated:
        out.value.model_metrics.setdefault("isolation", {})["process_s"] = out.seconds
    return out.value


def _runs_here_because(loaded: LoadedModel, settings: Settings) -> str | None:
    """Why the rows run in this process even under --isolation process, or None."""
    if settings.debug:
        return "--debug runs every row in the comparing process, so exceptions propagate"
    if loaded.origin is None:
        return "the model was built in memory and cannot be loaded again in a child process"
    return None


def _weight_source(loaded: LoadedModel, rows: Rows, settings: Settings, device: torch.device, dtype: torch.dtype,
                   progress: Progress) -> WeightSource:
    linears = linear_layers(loaded.model)
    samples, length, _ = settings.calibration(device)
    return WeightSource(
        model=loaded.model, linears={n: linears[n] for n in sorted(rows.targets)}, spec=rows.spec,
        model_key=loaded.info.get("hash") or loaded.name, tokenizer=loaded.tokenizer, device=device, dtype=dtype,
        calib_samples=samples, calib_len=length, calib_file=settings.calib_file,
        seed=settings.seed, use_cache=settings.cache, checkpoint=loaded.int4, progress=progress,
        read_codes=lambda: model_codes(loaded.model))


def _calibrations(row: RowSpec, rows: Rows, settings: Settings) -> set[str]:
    """The calibrating algorithms (gptq, awq) whose weights `row` needs."""
    shared = rows.shared
    if shared is not None and shared.from_checkpoint:
        return set()
    if row.kind is Kind.KERNEL:  # a --kernels row runs the shared weights
        wanted = {shared.backend}
    else:
        own = set(settings.plan["layers"].values()) if row.kind is Kind.PLAN else {row.backend}
        quantized = {n for n in own if registry.get(n).quantized}
        wanted = ({shared.backend} if quantized else set()) if shared is not None else quantized
    return {n for n in wanted if registry.get(n).needs_calibration}


def _backend_names(rows: Rows, settings: Settings) -> set[str]:
    """Every backend some row uses: a child process registers those importing does not."""
    names = set(rows.backends)
    names |= {rows.shared.backend} if rows.shared is not None and not rows.shared.from_checkpoint else set()
    return names | (set(settings.plan["layers"].values()) if settings.plan else set())


@contextmanager
def _parked(loaded: LoadedModel, device: torch.device) -> Iterator[None]:
    """On CUDA, the model's weights off the GPU while the rows' processes run, so each row's peak is its own."""
    if device.type != "cuda":
        yield
        return
    loaded.model.to("cpu")
    if loaded.int4 is not None:
        loaded.int4 = {n: w.to("cpu") for n, w in loaded.int4.items()}
    gc.collect()
    torch.cuda.empty_cache()
    try:
        yield
    finally:  # the caller gets its model back where it was
        loaded.model.to(device)
        if loaded.int4 is not None:
            loaded.int4 = {n: w.to(device) for n, w in loaded.int4.items()}


def _row(row: RowSpec, loaded: LoadedModel, rows: Rows, source: WeightSource, ref: Reference, settings: Settings,
         mode: str, device: torch.device, dtype: torch.dtype, flush: L2Flush, progress: Progress) -> BackendResult:
    """One row, isolated: whatever it raises becomes its status."""
    qmodel = None
    name = row.name
    try:
        with Sampler(device) as sampler:
            match row.kind:
                case Kind.ENGINE:
                    result = engine_row(name, registry.get(row.backend), loaded.model, ref, settings.steps)
                    result.model_metrics["telemetry"] = sampler.summary()
                    result.model_metrics["peak_memory_bytes"] = result.model_metrics["telemetry"]["peak_memory_bytes"]
                    return result
                case Kind.PLAN:
                    layers, weights = plan_layers(settings.plan, source, rows.shared, rows.backends)
                    quantized = {n for n, b in settings.plan["layers"].items() if registry.get(b).quantized}
                case Kind.KERNEL:
                    layers, weights = kernel_layers(row.kernel, source, rows.shared)
                    quantized = rows.targets
                case Kind.REFERENCE | Kind.BACKEND:
                    layers, weights = row_layers(row.backend, source, rows.shared)
                    quantized = rows.targets if registry.get(row.backend).quantized else set()
            qmodel = with_layers(loaded.model, layers, rows.spec)
            result = measure_row(name, qmodel, rows.targets, quantized, ref, settings.steps, mode, device, dtype, flush,
                                 progress, lambda: sampler.outside_peak(lambda: machinecheck.measure(device)))
            # Per-layer sensitivity belongs to a backend's own layers; the reference and a plan have none.
            if settings.sensitivity and result.status == "ok" and row.kind is not Kind.PLAN and quantized:
                qlins = {n: qmodel.get_submodule(n) for n in sorted(rows.targets)}
                sens = sensitivity(loaded.model, qlins, sorted(rows.targets), ref.eval_ids, ref.loss, progress)
                for r in result.layers:
                    if r.name in sens:
                        r.error["loss_delta"] = sens[r.name]
        result.weights = weights
        result.model_metrics["telemetry"] = sampler.summary()
        result.model_metrics["peak_memory_bytes"] = result.model_metrics["telemetry"]["peak_memory_bytes"]
        if row.kind is Kind.PLAN:
            result.model_metrics["plan"] = settings.plan
        if row.kind is Kind.KERNEL:
            result.model_metrics["only_kernel"] = row.kernel  # a --kernels row: not a backend name
        return result
    except NotRunnable as e:
        return BackendResult(name=name, status="unavailable", reason=str(e))
    except RowFailed as e:
        return BackendResult(name=name, status="failed", reason=str(e))
    except Exception as e:  # noqa: BLE001 - one backend's failure must not end the comparison
        if settings.debug:
            raise
        return BackendResult(name=name, status="failed", reason=_one_line(e, device))
    finally:
        del qmodel
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _calibrates(rows: Rows, settings: Settings, loaded: LoadedModel) -> bool:
    """Whether any row's weights come from a calibrating quantizer (not from a checkpoint)."""
    if loaded.int4 is not None:
        return False
    names = [rows.shared.backend] if rows.shared else rows.backends + list((settings.plan or {}).get("backends", []))
    return any(registry.get(n).needs_calibration for n in names if n in registry.names())


def verdict(comp: Comparison) -> list[str]:
    """One line per requested row that did not run, naming it, why and the fix; empty when every one ran.

    A finished comparison exits non-zero unless this is empty. Rows recorded `unavailable`
    under --skip-unavailable were left out on request, so they are not counted.
    """
    skipped_on_request = bool(comp.settings.get("skip_unavailable"))
    out = []
    for b in comp.backends:
        if b.status == "ok" or (b.status == "unavailable" and skipped_on_request):
            continue
        what = "failed" if b.status == "failed" else "could not run"
        role = " (the reference every row is measured against)" if b.role == "reference" else ""
        out.append(f"row {b.name}{role} {what}: {b.reason}; fix: {_fix(b)}")
    return out


def _fix(b: BackendResult) -> str:
    """What to do about a row that did not run, from what its reason says."""
    reason = b.reason or ""
    if "ModuleNotFoundError" in reason or "ImportError" in reason:
        hint = registry.get(b.name).install_hint if b.name in registry.names() else ""
        return f"install its library: {hint}" if hint else "install the module the reason names"
    if b.status == "unavailable":
        return "leave it out of --backends/--kernels, or pass --skip-unavailable to record it and exit 0"
    if "out of memory" in reason:
        return "use smaller --batch/--prefill values or fewer backends per run"
    if "reference model itself is non-finite" in reason:
        return "the model's own weights hold NaN or Inf: check or re-download the model"
    return "rerun with --debug (rows then run in this process) to see its traceback"


def findings(comp: Comparison) -> list[str]:
    """Per-layer isolated error of every quantized row against the baseline quantizer's (RTN), computed.

    The baseline row is the first measured row with the baseline quantizer's own weights. Also
    stored as model_metrics["isolated_error_vs_native"] on each row it applies to (the key
    keeps its schema name).
    """
    label = baseline_label()
    base = next((b for b in comp.backends if b.role == "measured" and b.status == "ok" and b.weights == label), None)
    if base is None:
        return []
    ref = {r.name: r.error["rel_isolated"] for r in base.layers if r.quantized}
    out = []
    for b in comp.backends:
        if b.status != "ok" or b.role != "measured" or b.weights == base.weights:
            continue
        pairs = [(r.error["rel_isolated"], ref[r.name]) for r in b.layers if r.quantized and r.name in ref]
        if not pairs:
            continue
        lower = sum(e < e0 for e, e0 in pairs)
        ratio = statistics.median(e / e0 for e, e0 in pairs if e0 > 0)
        b.model_metrics["isolated_error_vs_native"] = {"layers_lower": lower, "layers": len(pairs), "median_ratio": ratio}
        where = "every layer" if lower == len(pairs) else f"{lower} of {len(pairs)} layers"
        # Bits per weight side by side: an INT8 backend beating INT4 RTN is no like-for-like win.
        bits = f"{b.bits_per_weight:.2f} vs {base.bits_per_weight:.2f} bits/w"
        than = f"{base.name} {label.upper()}"
        out.append(f"{b.name} ({b.weights} weights): isolated error below {than} on {where} at {bits} "
                   f"(median ratio {ratio:.3f})" if lower else
                   f"{b.name} ({b.weights} weights): isolated error above {than} on every layer at {bits} "
                   f"(median ratio {ratio:.3f})")
    return out


def _one_line(e: BaseException, device: torch.device) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"out of memory on {device}: use smaller --batch/--prefill values or fewer backends per run"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {msg}{loc}"

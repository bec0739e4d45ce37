"""Orchestration: one reference run, then one isolated run per backend, as result records.

For every backend the model's linear layers are swapped for that backend's QuantLinear
(everything else is shared with the reference model, not copied), then:
  errors   isolated (each layer fed the reference input) and propagated (the model's own
           activations) against the reference layer outputs, on held-out text;
  latency  every linear timed inside real forward passes, for each M (decode batch sizes
           and the prefill length), plus the whole forward with probes off and on, which
           gives the probes' own overhead.
A backend's failure (exception, NaN, out of memory) becomes its status; the others go on.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import re
import statistics
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import backend as registry
from .errors import BackendUnavailable, UserError
from .hardware import device_info
from .instrument import L2Flush, LayerTimer, capture_io, isolated_error, propagated_error, time_calls
from .metrics import summarize
from .models import LoadedModel, linear_layers
from .results import BackendResult, Comparison, LayerRecord
from .spec import QuantSpec
from .telemetry import Sampler
from .workloads import decode_batches, prefill_batches, text_split, tokenize, windows

REFERENCE = "fp16"
CHECKPOINT = "checkpoint"  # shared weights read from a quantized checkpoint
PLAN = "plan"  # the row that runs a mixed-precision plan


@dataclass
class Settings:
    spec: QuantSpec = field(default_factory=QuantSpec)
    batches: list[int] = field(default_factory=lambda: [1, 16])
    prefill: int = 256  # 0 disables the prefill shape
    runs: int = 20
    warmup: int = 3
    eval_seqs: int = 2
    eval_len: int = 256
    skip: str = r"(^|\.)lm_head$"  # layers kept unquantized (regex on the module path)
    seed: int = 0
    skip_unavailable: bool = False
    calib_samples: int = 128
    calib_len: int = 512
    calib_file: str | None = None
    weights: str | None = None  # run this backend's weights through every kernel
    cache: bool = True  # reuse calibrated quantized weights from an earlier run
    eval_text: str | None = None  # a text file for perplexity and error (default: the shipped held-out split)
    sensitivity: bool = False  # per layer: eval loss with only that layer quantized (one forward each)
    plan: dict | None = None  # a mixed-precision plan (quantbridge plan) to run as one more row
    debug: bool = False  # re-raise backend failures instead of recording them

    def __post_init__(self) -> None:
        if self.runs < 5:
            raise UserError(f"--runs {self.runs} is too few for a median with p10/p90; use at least 5 (20 is the default)")
        if any(m < 1 for m in self.batches) or self.prefill < 0:
            raise UserError("--batch values must be >= 1 and --prefill >= 0")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise UserError("--calib-samples must be >= 1 and --calib-len >= 2")

    @property
    def m_values(self) -> list[int]:
        ms = sorted(set(self.batches))
        return ms + ([self.prefill] if self.prefill and self.prefill not in ms else [])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("debug")
        d["m_values"] = self.m_values
        return d


class Progress:
    """What compare tells about its progress; the CLI renders it, tests ignore it."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


def with_layers(model: nn.Module, layers: dict[str, nn.Module], spec: QuantSpec) -> nn.Module:
    """A structural copy of `model` with `layers` swapped in; all other tensors are shared.

    Linears not in `layers` go to the reference backend, so they are probed the same way.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, memo)
    reference = registry.get(REFERENCE)
    for name, lin in linear_layers(clone).items():
        clone.set_submodule(name, layers[name] if name in layers else reference.quantize(lin, spec))
    return clone


class NotRunnable(Exception):
    """This backend cannot run the requested weights (recorded as status 'unavailable')."""


class Comparer:
    def __init__(self, loaded: LoadedModel, names: list[str], settings: Settings, device: torch.device,
                 dtype: torch.dtype, progress: Progress | None = None) -> None:
        self.loaded, self.settings, self.device, self.dtype = loaded, settings, device, dtype
        self.progress = progress or Progress()
        self.names = [REFERENCE] + [n for n in names if n != REFERENCE]
        self.linears = linear_layers(loaded.model)
        if not self.linears:
            raise UserError(f"model {loaded.name!r} has no nn.Linear layers to compare")
        skip = re.compile(settings.skip)
        if loaded.int4 is not None:  # a quantized checkpoint: its layers, its weights, every kernel
            if settings.weights is not None:
                raise UserError(f"{loaded.name} is a quantized checkpoint: its own weights are run through every "
                                f"backend; drop --weights")
            self.targets = set(loaded.int4)
            from .checkpoint import spec_of

            settings.spec = spec_of(loaded.int4)
        else:
            self.targets = {n for n in self.linears if not skip.search(n)}
            for n in self.targets:
                settings.spec.check_layer(n, self.linears[n].in_features)
        self.backends = {n: registry.get(n) for n in self.names}
        self.availability = {n: b.available(device) for n, b in self.backends.items()}
        for n, b in self.backends.items():
            a = self.availability[n]
            if not a.ok and not settings.skip_unavailable:
                hint = f"; {b.install_hint}" if b.install_hint else ""
                raise BackendUnavailable(f"backend {n} is unavailable: {a.reason}{hint} (or pass --skip-unavailable)")
            if a.ok:
                b.check_spec(settings.spec)
        self.flush = L2Flush(device)
        self.shared_from = CHECKPOINT if loaded.int4 is not None else settings.weights
        if self.shared_from not in (None, CHECKPOINT):
            src = registry.get(self.shared_from)
            if not _canonical(src):
                raise UserError(f"--weights {self.shared_from}: its weights are not canonical INT4; "
                                f"use one of: {', '.join(n for n in registry.names() if _canonical(registry.get(n)))}")
            if not src.available(device).ok:
                raise BackendUnavailable(f"--weights {self.shared_from}: {src.available(device).reason}")
            self.backends.setdefault(self.shared_from, src)
        self._calib = None
        self._weights_cache: dict[str, dict] = {}

    # -- inputs -----------------------------------------------------------------------------
    def _inputs(self) -> None:
        s = self.settings
        tokens = tokenize(self.loaded.tokenizer, text_split("eval"))
        eval_tokens = tokens if s.eval_text is None else tokenize(self.loaded.tokenizer, _read_text(s.eval_text))
        if eval_tokens.numel() < s.eval_seqs * s.eval_len:
            raise UserError(f"evaluation text has {eval_tokens.numel()} tokens; --eval-seqs x --eval-len needs "
                            f"{s.eval_seqs * s.eval_len}: give a longer --eval-text or smaller values")
        self.eval_ids = windows(eval_tokens, s.eval_seqs, s.eval_len, 1, s.seed)[0].to(self.device)
        n = s.warmup + s.runs
        self.step_inputs: dict[int, list[torch.Tensor]] = {}
        for m in self.m_values:
            make = prefill_batches if (m == s.prefill and m not in s.batches) else decode_batches
            self.step_inputs[m] = [x.to(self.device) for x in make(tokens, m, n, s.seed + m)]

    @property
    def m_values(self) -> list[int]:
        return self.settings.m_values

    # -- runs -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, on_result: Callable[[Comparison], None] | None = None) -> Comparison:
        self._inputs()
        model = self.loaded.model
        with capture_io(self.linears) as ref_io:
            ref = model(input_ids=self.eval_ids, labels=self.eval_ids, use_cache=False)
        self.ref_logits, self.ref_loss = ref.logits.float().cpu(), ref.loss.item()
        self.ref_io = ref_io
        comp = Comparison(
            model=self.loaded.info,
            device=device_info(self.device),
            settings={**self.settings.to_dict(), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                      "l2_flush": self.flush.active, "eval_tokens": self.eval_ids.numel(),
                      "eval_source": self.settings.eval_text or "shipped held-out split (python_reference.txt)",
                      "eval_context": self.settings.eval_len,
                      "decode_m": sorted(set(self.settings.batches)),
                      "prefill_m": [self.settings.prefill] if self.settings.prefill else []},
        )
        for name in self.names + ([PLAN] if self.settings.plan else []):
            comp.backends.append(self._run_one(name))
            comp.findings = findings(comp)
            if on_result:
                on_result(comp)
        return comp

    def _run_one(self, name: str) -> BackendResult:
        if name != PLAN and not self.availability[name].ok:
            return BackendResult(name=name, status="unavailable", reason=self.availability[name].reason)
        qmodel = None
        try:
            with Sampler(self.device) as sampler:
                layers, weights = self._plan_layers() if name == PLAN else self._layers(name)
                qmodel = with_layers(self.loaded.model, layers, self.settings.spec)
                result = self._measure(name, qmodel)
            result.weights = weights
            result.model_metrics["telemetry"] = sampler.summary()
            result.model_metrics["peak_memory_bytes"] = result.model_metrics["telemetry"]["peak_memory_bytes"]
            if name == PLAN:
                result.model_metrics["plan"] = self.settings.plan
            return result
        except NotRunnable as e:
            return BackendResult(name=name, status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one backend's failure must not end the comparison
            if self.settings.debug:
                raise
            return BackendResult(name=name, status="failed", reason=_one_line(e, self.device))
        finally:
            del qmodel
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _plan_layers(self) -> tuple[dict[str, nn.Module], str]:
        """Each layer from the backend the plan assigns it (unassigned layers stay reference)."""
        choice = self.settings.plan["layers"]
        unknown = sorted(set(choice.values()) - set(self.backends))
        if unknown:
            raise NotRunnable(f"the plan uses backends not in this run: {', '.join(unknown)} (add them to --backends)")
        out = {}
        for name in sorted(set(choice.values())):
            # Build only the layers assigned to this backend, so the row's memory is the plan's.
            layers, _ = self._layers(name, only={n for n, b in choice.items() if b == name})
            out.update(layers)
        return out, "plan"

    # -- quantization -------------------------------------------------------------------------
    def _layers(self, name: str, only: set[str] | None = None) -> tuple[dict[str, nn.Module], str]:
        """This backend's layers for every target (or the `only` ones), and which weights they hold."""
        from .smoothing import build

        b, spec = self.backends[name], self.settings.spec
        lins = {n: self.linears[n] for n in sorted(self.targets) if only is None or n in only}
        if not b.quantized:
            return {n: b.quantize(lin, spec) for n, lin in lins.items()}, "unquantized"
        if self.shared_from is not None:
            if not b.runs_int4():
                raise NotRunnable(f"{name} cannot run {self.shared_from}'s INT4 weights (its own format only)")
            ws = self._weights(self.shared_from)
            label = (f"checkpoint ({self.loaded.info['checkpoint']['format']})" if self.shared_from == CHECKPOINT
                     else f"{self.shared_from} (shared)")
        else:
            ws = self._weights(name) if b.needs_calibration else None
            label = b.algorithm or name
        self.progress.begin(f"{name}: build layers", len(lins))
        out = {}
        for n, lin in lins.items():
            out[n] = build(b, ws[n], lin.bias) if ws is not None else b.quantize(lin, spec)
            self.progress.advance()
        return out, label

    def _weights(self, name: str) -> dict:
        """Canonical weights made by backend `name`'s algorithm; calibrated ones cached on disk."""
        from . import qcache
        from .cachedir import cache_dir
        from .workloads import calibration

        if name == CHECKPOINT:
            return self.loaded.int4
        if name in self._weights_cache:
            return self._weights_cache[name]
        b, s = self.backends[name], self.settings
        lins = {n: self.linears[n] for n in sorted(self.targets)}
        if not b.needs_calibration:
            self.progress.begin(f"{name}: quantize", len(lins))
            ws = {}
            for n, lin in lins.items():
                ws[n] = b.quantize_weights_of(lin, s.spec)
                self.progress.advance()
        else:
            if self._calib is None:
                self._calib = calibration(self.loaded.tokenizer, s.calib_samples, s.calib_len, s.calib_file, s.seed)
            k = qcache.key(model=self.loaded.info.get("hash") or self.loaded.name, algorithm=b.algorithm,
                           library=b.available(self.device).reason, spec=s.spec.to_dict(), calib=self._calib.digest,
                           dtype=str(self.dtype), targets=sorted(lins), device=self.device.type)
            ws = qcache.load(cache_dir(), k, self.device) if s.cache else None
            if ws is None:
                self.progress.begin(f"{name}: calibrate + quantize ({s.calib_samples}x{s.calib_len} tokens)", 1)
                ws = b.quantize_weights(self.loaded.model, lins, s.spec, self._calib)
                self.progress.advance()
                qcache.save(cache_dir(), k, ws)
        self._weights_cache[name] = ws
        return ws

    def _is_quantized(self, backend: str, layer: str) -> bool:
        if backend == PLAN:
            return self.backends.get(self.settings.plan["layers"].get(layer, REFERENCE), self.backends[REFERENCE]).quantized
        return layer in self.targets and self.backends[backend].quantized

    def _sensitivity(self, qlins: dict[str, nn.Module]) -> dict[str, float]:
        """Eval loss increase with only one layer swapped into the reference model, per layer."""
        model, out = self.loaded.model, {}
        self.progress.begin("sensitivity", len(self.targets))
        for n in sorted(self.targets):
            original = model.get_submodule(n)
            model.set_submodule(n, qlins[n])
            try:
                loss = model(input_ids=self.eval_ids, labels=self.eval_ids, use_cache=False).loss.item()
            finally:
                model.set_submodule(n, original)
            out[n] = loss - self.ref_loss
            self.progress.advance()
        return out

    def _measure(self, name: str, qmodel: nn.Module) -> BackendResult:
        s = self.settings
        qlins = {n: qmodel.get_submodule(n) for n in self.linears}
        self.progress.begin(f"{name}: error", len(qlins))
        with propagated_error(qlins, self.ref_io) as prop:
            out = qmodel(input_ids=self.eval_ids, labels=self.eval_ids, use_cache=False)
        iso = {}
        for n, mod in qlins.items():
            iso[n] = isolated_error(mod, *self.ref_io[n], self.device, self.dtype)
            self.progress.advance()
        bad = [n for n in qlins if math.isnan(iso[n].rel_l2) or math.isnan(prop[n].rel_l2)]
        if bad:
            return BackendResult(name=name, status="failed", reason=f"non-finite output in layer {bad[0]}",
                                 kernel=_kernels(qlins, self.targets))

        lat: dict[str, dict[int, dict]] = {n: {} for n in qlins}
        metrics: dict = {"forward_us": {}, "forward_probed_us": {}, "probe_overhead_pct": {}, "tokens_per_s": {}}
        self.progress.begin(f"{name}: timing", len(self.m_values))
        for m in self.m_values:
            inputs = self.step_inputs[m]
            fwd = lambda x: qmodel(input_ids=x, use_cache=False)  # noqa: E731
            for x in inputs[: s.warmup]:
                fwd(x)
            timed = inputs[s.warmup:]
            off = summarize(time_calls(fwd, timed, self.device, self.flush))
            with LayerTimer(qlins, self.device, len(timed)) as timer:
                on = summarize(time_calls(fwd, timed, self.device, self.flush))
            for n, samples in timer.samples_us().items():
                lat[n][m] = summarize(samples).to_dict()
            key = str(m)
            metrics["forward_us"][key] = off.to_dict()
            metrics["forward_probed_us"][key] = on.to_dict()
            metrics["probe_overhead_pct"][key] = 100 * (on.median - off.median) / off.median
            metrics["tokens_per_s"][key] = m * 1e6 / off.median
            self.progress.advance()

        metrics["eval_loss"] = out.loss.item()
        metrics["eval_ppl"] = math.exp(out.loss.item())
        metrics["eval_ppl_reference"] = math.exp(self.ref_loss)
        metrics["decode_tokens_per_s"] = {str(m): metrics["tokens_per_s"][str(m)] for m in sorted(set(self.settings.batches))}
        if self.settings.prefill and str(self.settings.prefill) in metrics["forward_us"]:
            metrics["prefill_latency_us"] = metrics["forward_us"][str(self.settings.prefill)]["median"]
        # Per-layer sensitivity belongs to a backend's own layers; the reference and a plan have none.
        wanted = self.settings.sensitivity and name not in (PLAN, REFERENCE) and self.backends[name].quantized
        sens = self._sensitivity(qlins) if wanted else {}
        metrics["logits_rel_error"] = _rel(out.logits.float().cpu(), self.ref_logits)
        layers = [
            LayerRecord(
                name=n,
                shape=[mod.out_features, mod.in_features],
                quantized=self._is_quantized(name, n),
                kernel=mod.kernel,
                weight_bytes=mod.weight_nbytes,
                latency_us={str(m): v for m, v in lat[n].items()},
                error={"rel_isolated": iso[n].rel_l2, "rel_propagated": prop[n].rel_l2,
                       "sqnr_db": iso[n].sqnr_db, "cosine": iso[n].cosine,
                       **({"loss_delta": sens[n]} if n in sens else {})},
            )
            for n, mod in qlins.items()
        ]
        quant = [r for r in layers if r.quantized] or [r for r in layers if r.name in self.targets]
        params = sum(r.shape[0] * r.shape[1] for r in quant)
        return BackendResult(
            name=name, status="ok", kernel=_kernels(qlins, self.targets),
            weight_bytes=sum(r.weight_bytes for r in layers),
            bits_per_weight=8 * sum(r.weight_bytes for r in quant) / params,
            layers=layers, model_metrics=metrics,
        )


def _read_text(path: str) -> str:
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"evaluation text {path!r} does not exist; pass a UTF-8 text file to --eval-text")
    return p.read_text(encoding="utf-8", errors="replace")


def findings(comp: Comparison, baseline: str = "native") -> list[str]:
    """Per-layer isolated error of every quantized backend against RTN (`native`), computed.

    Also stored as model_metrics["isolated_error_vs_native"] on each backend it applies to.
    """
    base = comp.backend(baseline)
    if base is None or base.status != "ok":
        return []
    ref = {r.name: r.error["rel_isolated"] for r in base.layers if r.quantized}
    out = []
    for b in comp.backends:
        if b.status != "ok" or b.name in (baseline, PLAN) or b.weights == base.weights:
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
        out.append(f"{b.name} ({b.weights} weights): isolated error below native RTN on {where} at {bits} "
                   f"(median ratio {ratio:.3f})" if lower else
                   f"{b.name} ({b.weights} weights): isolated error above native RTN on every layer at {bits} "
                   f"(median ratio {ratio:.3f})")
    return out


def _canonical(b: registry.Backend) -> bool:
    """Whether a backend's algorithm yields canonical INT4 weights that --weights can share."""
    return b.quantized and (b.needs_calibration or type(b).quantize_weights_of is not registry.Backend.quantize_weights_of)


def _kernels(qlins: dict[str, nn.Module], targets: set[str]) -> str:
    ks = sorted({qlins[n].kernel for n in targets})
    return "+".join(ks)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double())).item()


def _one_line(e: BaseException, device: torch.device) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return f"out of memory on {device}: use smaller --batch/--prefill values or fewer backends per run"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" (at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {msg}{loc}"

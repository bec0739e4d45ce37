"""Where a row's layers come from: which weights, made by which algorithm, run by which kernel.

A row runs either its own backend's weights (its quantizer: RTN, GPTQ, AWQ, bitsandbytes'
code book) or weights shared by every row: a quantized checkpoint's, or one algorithm's
(`--weights`), so that rows differ only in the kernel. Canonical weights are made once per
comparison; calibrated ones are cached on disk.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from quantbridge.files.faults import WriteFailed
from quantbridge.models import qcache
from quantbridge.models.loaded import linear_layers
from quantbridge.models.text import calibration
from quantbridge.plugin import backend as registry
from quantbridge.plugin.availability import ask
from quantbridge.plugin.backend import Backend, Pairing
from quantbridge.plugin.errors import BackendUnavailable, NotRunnable, UserError
from quantbridge.plugin.files import cache_dir
from quantbridge.plugin.kernel import build_exactly
from quantbridge.plugin.packed import Int4Weight
from quantbridge.plugin.quantizer import Calibration, ModelCodes, get_quantizer
from quantbridge.plugin.smoothing import build
from quantbridge.plugin.spec import QuantSpec
from quantbridge.run.rowspec import Shared


class Progress:
    """What a comparison tells about its progress; the CLI renders it, tests ignore it."""

    def begin(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _Labelled(Progress):
    """A stage of a longer step: `begin("layer group", 30)` shows as "LABEL: layer group"."""

    def __init__(self, inner: Progress, label: str) -> None:
        self.inner, self.label, self.began = inner, label, False

    def begin(self, description: str, total: int) -> None:
        self.began = True  # the stages now own the bar: the step's own final advance is not theirs
        self.inner.begin(f"{self.label}: {description}", total)

    def advance(self, n: int = 1) -> None:
        self.inner.advance(n)


def with_layers(model: nn.Module, layers: dict[str, nn.Module], spec: QuantSpec) -> nn.Module:
    """A structural copy of `model` with `layers` swapped in; all other tensors are shared.

    Linears not in `layers` go to the reference backend, so they are probed the same way.
    """

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    clone = copy.deepcopy(model, memo)
    reference = registry.get(registry.reference_name())
    for name, lin in linear_layers(clone).items():
        clone.set_submodule(name, layers[name] if name in layers else reference.quantize(lin, spec))
    return clone


def canonical(b: Backend) -> bool:
    """Whether a backend's algorithm yields canonical INT4 weights that rows can share."""
    return isinstance(b, Pairing) and b.quantized


def shared_source(checkpoint_format: str | None, weights: str | None, device: torch.device) -> Shared | None:
    """Whose weights every row runs: the checkpoint's (MODEL is one: its format), `--weights`' algorithm's,
    or none (each row its own)."""
    if checkpoint_format is not None:
        if weights is not None:
            raise UserError("MODEL is a quantized checkpoint: its own weights are run through every backend; "
                            "drop --weights")
        return Shared(None, checkpoint_format)
    if weights is None:
        return None
    src = registry.get(weights)
    if not canonical(src):
        raise UserError(f"--weights {weights}: its weights are not canonical INT4; use one of: "
                        f"{', '.join(n for n in registry.names() if canonical(registry.get(n)))}")
    here = ask(src.available, device)
    if not here.ok:
        raise BackendUnavailable(f"--weights {weights}: {here.reason}")
    return Shared(weights)


@dataclass
class WeightSource:
    """Canonical INT4 weights by the backend whose algorithm makes them, made once and kept.

    `checkpoint` holds a quantized checkpoint's decoded weights, if MODEL is one.
    """

    model: nn.Module
    linears: dict[str, nn.Linear]  # the layers to quantize (targets), by path
    spec: QuantSpec
    model_key: str  # identifies the model for the on-disk cache
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    calib_samples: int = 128
    calib_len: int = 512
    calib_file: str | None = None
    seed: int = 0
    use_cache: bool = True
    checkpoint: dict[str, Int4Weight] | None = None
    progress: Progress = field(default_factory=Progress)
    # The codes the model's own file holds (a GGUF's), read only when a row asks for them.
    read_codes: Callable[[], ModelCodes | None] = lambda: None

    def __post_init__(self) -> None:
        self._made: dict[str, dict[str, Int4Weight]] = {}
        self._calib: Calibration | None = None

    def shared(self, shared: Shared) -> dict[str, Int4Weight]:
        """The weights every row runs: the checkpoint's, or the --weights backend's."""
        return self.checkpoint if shared.from_checkpoint else self.get(shared.backend)

    def get(self, name: str) -> dict[str, Int4Weight]:
        """Backend `name`'s own weights."""
        if name not in self._made:
            b = registry.get(name)
            if isinstance(b, Pairing) and b.reads_model:  # read from the model's own file: nothing to calibrate or cache
                self.progress.begin(f"{b.name}: read the model's codes", 1)
                self._made[name] = b.read_weights(self.read_codes(), self.linears)
                self.progress.advance()
            else:
                self._made[name] = self._calibrated(b) if b.needs_calibration else self._layerwise(b)
        return self._made[name]

    def _layerwise(self, b: Backend) -> dict[str, Int4Weight]:
        self.progress.begin(f"{b.name}: quantize", len(self.linears))
        out = {}
        for n, lin in self.linears.items():
            out[n] = b.quantize_weights_of(lin, self.spec)
            self.progress.advance()
        return out

    def _calibrated(self, b: Backend) -> dict[str, Int4Weight]:
        if self._calib is None:
            self._calib = calibration(self.tokenizer, self.calib_samples, self.calib_len, self.calib_file, self.seed)
        # The quantizer's library and version (not the backend's kernels: they do not change the weights).
        library = (get_quantizer(b.quantizer) if b.quantizer else b).available(self.device).reason
        key = qcache.key(model=self.model_key, algorithm=b.weights_label, library=library,
                         spec=self.spec.to_dict(), calib=self._calib.digest, dtype=str(self.dtype),
                         targets=sorted(self.linears), device=self.device.type)
        ws = qcache.load(cache_dir(), key, self.device) if self.use_cache else None
        if ws is None:
            label = f"{b.name}: calibrate + quantize ({self.calib_samples}x{self.calib_len} tokens)"
            self.progress.begin(label, 1)  # the library's stages, where it reports them, refine this bar
            stages = _Labelled(self.progress, label)
            ws = b.quantize_weights(self.model, self.linears, self.spec, replace(self._calib, progress=stages))
            if not stages.began:
                self.progress.advance()
            try:
                qcache.save(cache_dir(), key, ws)
            except WriteFailed:  # the cache only saves the next run time: a full disk must not lose this one's work
                pass
        return ws


def row_layers(name: str, source: WeightSource, shared: Shared | None,
               only: set[str] | None = None) -> tuple[dict[str, nn.Module], str]:
    """Backend `name`'s layers for every target (or the `only` ones), and a label for their weights."""

    b = registry.get(name)
    lins = {n: lin for n, lin in source.linears.items() if only is None or n in only}
    if not b.quantized:
        return {n: b.quantize(lin, source.spec) for n, lin in lins.items()}, "unquantized"
    if shared is not None:
        if not b.runs_int4():
            raise NotRunnable(f"{name} cannot run {shared.name}'s INT4 weights (its own format only)")
        ws = source.shared(shared)
        label = shared.label
    else:
        ws = source.get(name) if b.whole_model else None
        label = b.weights_label
    source.progress.begin(f"{name}: build layers", len(lins))
    out = {}
    for n, lin in lins.items():
        # A UserError is a kernel saying it cannot run this here (no kernel can hold the weight, a
        # group size it lacks); for weights made elsewhere, so is a codec's ValueError (act-order
        # in AWQ's layout). Anything else is the row's failure.
        cannot = (UserError,) if ws is None or shared is None else (UserError, ValueError)
        try:
            out[n] = b.quantize(lin, source.spec) if ws is None else build(b.from_int4, ws[n], lin.bias)
        except cannot as e:
            raise NotRunnable(f"{name} cannot run layer {n}: {e}") from None
        source.progress.advance()
    return out, label


def kernel_layers(kernel: str, source: WeightSource, shared: Shared) -> tuple[dict[str, nn.Module], str]:
    """The shared weights of every target through exactly one kernel (a `--kernels` row)."""
    ws = source.shared(shared)
    source.progress.begin(f"{kernel}: build layers", len(source.linears))
    out = {}
    for n, lin in source.linears.items():
        try:
            out[n] = build(partial(build_exactly, kernel), ws[n], lin.bias)
        except NotRunnable as e:
            raise NotRunnable(f"kernel {kernel} cannot run layer {n}: {e}") from None
        source.progress.advance()
    return out, shared.label


def plan_layers(plan: dict, source: WeightSource, shared: Shared | None,
                names: list[str]) -> tuple[dict[str, nn.Module], str]:
    """Each layer from the backend the plan assigns it (unassigned layers stay reference)."""
    choice = plan["layers"]
    unknown = sorted(set(choice.values()) - set(names))
    if unknown:
        raise NotRunnable(f"the plan uses backends not in this run: {', '.join(unknown)} (add them to --backends)")
    out: dict[str, nn.Module] = {}
    for name in sorted(set(choice.values())):
        # Build only the layers assigned to this backend, so the row's memory is the plan's.
        layers, _ = row_layers(name, source, shared, only={n for n, b in choice.items() if b == name})
        out.update(layers)
    return out, "plan"

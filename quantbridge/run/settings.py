"""What a comparison is asked to do: one plain dataclass, checked when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from quantbridge.plugin.errors import UserError
from quantbridge.plugin.spec import AUTO_GROUP, QuantSpec

# How per-layer time is taken on CUDA (on the CPU every mode is synchronous host timing):
#   graph    the whole step captured as one CUDA graph, events recorded inside it (default on CUDA)
#   eager    plain forward passes, events around each layer, host enqueue cost per call beside it
#   compile  torch.compile(mode="reduce-overhead"): whole-step time only
TIMING_MODES = ("auto", "graph", "eager", "compile")

# Calibration (GPTQ, AWQ) sequences x tokens. The full size is what llm-compressor's examples
# use; on a CPU it takes an hour for SmolLM2-135M, so CPU runs default to a smaller one whose
# cost in perplexity is measured in docs/calibration.md. --full-calibration asks for the full size.
CALIB_FULL = (128, 512)
CALIB_CPU = (16, 256)


def calibration_size(samples: int | None, length: int | None, device: torch.device,
                     full: bool = False) -> tuple[int, int, str]:
    """(samples, length, why): what was asked, else the full size on a GPU or with `full`, else the CPU size."""
    default, why = (CALIB_FULL, "full") if full or device.type == "cuda" else (CALIB_CPU, "CPU default")
    if samples is not None and length is not None:
        return samples, length, "as given"
    return (samples or default[0], length or default[1],
            why if samples is None and length is None else f"as given, else the {why}")


@dataclass(frozen=True)
class Steps:
    """The timed steps: decode batch sizes, a prefill length (0: none), warm-up and timed runs per M."""

    batches: tuple[int, ...]
    prefill: int
    warmup: int
    runs: int

    @property
    def m_values(self) -> list[int]:
        ms = sorted(set(self.batches))
        return ms + ([self.prefill] if self.prefill and self.prefill not in ms else [])

    def is_prefill(self, m: int) -> bool:
        return m == self.prefill and m not in self.batches


@dataclass
class Settings:
    """What a comparison was asked to do, checked when made. It stays at the request: each step takes
    the few values it needs (`steps`, the eval text, the seed) as arguments."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(group_size=AUTO_GROUP))  # auto: fitted to the layers
    batches: list[int] = field(default_factory=lambda: [1, 16])
    prefill: int = 256  # 0 disables the prefill shape
    runs: int = 20
    warmup: int = 3
    eval_seqs: int = 2
    eval_len: int = 256
    skip: str = r"(^|\.)lm_head$"  # layers kept unquantized (regex on the module path)
    seed: int = 0
    skip_unavailable: bool = False
    calib_samples: int | None = None  # None: calibration_size's default for the device
    calib_len: int | None = None
    full_calibration: bool = False  # the full size (CALIB_FULL) on any device
    calib_file: str | None = None
    weights: str | None = None  # run this backend's weights through every kernel
    kernels: list[str] | None = None  # with shared weights: one more row per kernel, exactly that kernel
    cache: bool = True  # reuse calibrated quantized weights from an earlier run
    eval_text: str | None = None  # a text file for perplexity and error (default: the shipped held-out split)
    sensitivity: bool = False  # per layer: eval loss with only that layer quantized (one forward each)
    plan: dict | None = None  # a mixed-precision plan (quantbridge plan) to run as one more row
    mode: str = "auto"  # timing mode, one of TIMING_MODES
    debug: bool = False  # re-raise backend failures instead of recording them

    def __post_init__(self) -> None:
        if self.runs < 5:
            raise UserError(f"--runs {self.runs} is too few for a median with p10/p90; use at least 5 (20 is the default)")
        if any(m < 1 for m in self.batches) or self.prefill < 0:
            raise UserError("--batch values must be >= 1 and --prefill >= 0")
        if (self.calib_samples is not None and self.calib_samples < 1) or (self.calib_len is not None and self.calib_len < 2):
            raise UserError("--calib-samples must be >= 1 and --calib-len >= 2")
        if self.mode not in TIMING_MODES:
            raise UserError(f"--mode {self.mode!r} is not one of {', '.join(TIMING_MODES)}")

    @property
    def steps(self) -> Steps:
        return Steps(tuple(self.batches), self.prefill, self.warmup, self.runs)

    @property
    def m_values(self) -> list[int]:
        return self.steps.m_values

    def calibration(self, device: torch.device) -> tuple[int, int, str]:
        return calibration_size(self.calib_samples, self.calib_len, device, self.full_calibration)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("debug")
        d["m_values"] = self.m_values
        return d


def timing_mode(requested: str, device: torch.device) -> str:
    """The mode a run uses: `auto` is graph on CUDA and eager (synchronous) on the CPU."""
    if device.type != "cuda":
        if requested in ("graph", "compile"):
            raise UserError(f"--mode {requested} needs a CUDA device; on {device.type} timing is synchronous "
                            f"(--mode eager, the default there)")
        return "eager"
    return "graph" if requested == "auto" else requested

"""The native kernel's tuner: per (M bucket, layer shape, settings), the configuration that timed fastest.

Every candidate of int4_configs is launched and timed once on this device (int4_settings.TUNE_TIMING says
how), the front of the field again in turns (kernels/tuning.py), and the pick is kept in a table on disk per
kernel revision, device and Triton, so a second run does not retune. How a candidate is launched is the
caller's (int4_triton hands it in): the tuner knows configurations, keys, timing and the table only.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

import torch
import triton

from quantbridge.kernels import int4_configs as configs
from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels.int4_configs import DEQUANT_CUBLAS, Config, candidate_configs, counter_slots, m_bucket
from quantbridge.kernels.int4_layouts import OPERAND_LAYOUTS, sz_format
from quantbridge.kernels.tune_timing import check_timing, release, time_ms
from quantbridge.kernels.tuning import pick_fastest
from quantbridge.plugin.files import cache_dir, write_atomic
from quantbridge.plugin.packed import Int4Weight

# How the tuner launches one candidate on its own x and out: (cfg, x, out, counters or None, w, laid, layout,
# packed scales) -> a callable that launches it once, or None where the candidate cannot run this layer.
CandidateRun = Callable[[Config, torch.Tensor, torch.Tensor, "torch.Tensor | None", Int4Weight, "Int4Weight | None",
                         str, "torch.Tensor | None"], "Callable[[], object] | None"]


def tuner_key(m: int, n: int, k: int, group: int, dtype: torch.dtype, layout: str, sz_fmt: int,
              ws_tiles: bool = False) -> str:
    """The tuned table's key of one M bucket of a layer: the shape and every setting that changes which
    candidates run or how they are timed (the ws fast launch changes what eager timing adds to them).
    sz_fmt: sz_format of the scales the tiles read (0 none, 1 [N, G] words, 2 split words); ws_tiles:
    int4_wgmma's tiles are among the candidates."""
    s = settings
    check_timing(s.TUNE_TIMING)
    fix = ws_tiles and s.FIXUP_ROWS
    return f"m{m_bucket(m)}-n{n}-k{k}-g{group}-{str(dtype).removeprefix('torch.')}" + f"-{s.CODE_MODE}" \
        + ("" if layout == "canonical" else f"-{layout}") \
        + ("", "-sz", "-sz25")[sz_fmt] \
        + ("-streamk" if s.STREAM_K and layout in OPERAND_LAYOUTS else "") \
        + ("-ws" if ws_tiles else "") \
        + (f"-lag{s.RELEASE_LAG}" if ws_tiles and s.RELEASE_LAG != 1 else "") \
        + (f"-fix{s.FIXUP_ROWS}" if fix else "") \
        + (f"-ld{s.FIXUP_LOADS}" if fix and s.FIXUP_LOADS != 1 else "") \
        + ("-slc" if fix and s.FIXUP_SLICED else "") \
        + ("-cp2" if ws_tiles and s.CONSUMER_PARTS == 2 else "") \
        + ("-fl" if ws_tiles and s.FAST_LAUNCH else "") \
        + ("-wsdecode" if s.WGMMA_WS_DECODE and m_bucket(m) <= 16 and layout == "operand-tiled" else "") \
        + ("-wk" if s.DECODE_WARP_K and m_bucket(m) <= 8 and layout in OPERAND_LAYOUTS else "") \
        + {"do_bench": "", "read": "-frd", "graph": "-tgr"}[s.TUNE_TIMING]


def log_search(key: str, timed: list[tuple[Config, float]], again: dict[Config, list[float]], best: Config) -> None:
    """One JSON line per search appended to $QUANTBRIDGE_TUNE_LOG where it is set (a diagnostic, off by
    default): every candidate's first time, the finalists' times again and the pick, so that a pick
    can be laid beside the bench's times of the same tiles."""
    path = os.environ.get("QUANTBRIDGE_TUNE_LOG")
    if not path:
        return
    line = {"key": key, "timing": settings.TUNE_TIMING, "pick": list(best),
            "first_ms": [[list(c), t] for c, t in sorted(timed, key=lambda ct: ct[1])],
            "again_ms": [[list(c), ts] for c, ts in again.items()]}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


class Tuner:
    """Picks a configuration per shape by timing every candidate once; remembers it on disk.
    run_candidate: how a candidate is launched (CandidateRun; int4_triton.candidate_run)."""

    def __init__(self, run_candidate: CandidateRun) -> None:
        self.run_candidate = run_candidate
        self.lock = threading.Lock()
        self.table: dict[str, list[int]] = {}
        self.path: Path | None = None
        self.memo: dict[tuple[torch.device, str], Config] = {}

    def _file(self, device: torch.device) -> Path:
        name = torch.cuda.get_device_name(device).replace(" ", "_")
        return cache_dir() / f"triton-int4-{settings.REVISION}-{name}-triton{triton.__version__}.json"

    def _load(self, device: torch.device) -> None:
        path = self._file(device)
        if self.path != path:
            self.path = path
            self.table = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        write_atomic(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def config(self, x2: torch.Tensor, w: Int4Weight, laid: Int4Weight | None = None,
               layout: str = "canonical", sz: torch.Tensor | None = None) -> Config:
        """laid: the same weight in `layout` (int4_layouts), which the candidates then read; w is what
        DEQUANT_CUBLAS reads: canonical codes, or for the operand layout the same operand codes.
        sz: the packed scales and zero points the layer's tiles read (pack_scales_zeros), or None."""
        m, k = x2.shape
        n = w.out_features
        if settings.interpreting() or not x2.is_cuda:
            # The interpreter checks correctness, not speed: take the first valid candidate.
            return candidate_configs(m_bucket(m), n, k, w.group_size, layout)[0]
        # The layout is in the key where it is not the canonical one: in one mode, a bound layer and an
        # unbound call of the same shape read different layouts (and older tables keep their keys).
        ws_tiles = layout == "operand-tiled" and sz is not None and configs.ws_module() is not None
        key = tuner_key(m, n, k, w.group_size, x2.dtype, layout, sz_format(sz, n, k // w.group_size), ws_tiles)
        hit = self.memo.get((x2.device, key))
        if hit is not None:  # the per-call path: one dict lookup
            return hit
        with self.lock:
            self._load(x2.device)
            if key not in self.table:
                self.table[key] = list(self._search(x2, w, m_bucket(m), laid, layout, sz, key))
                self._save()
            self.memo[(x2.device, key)] = tuple(self.table[key])
            return self.memo[(x2.device, key)]  # type: ignore[return-value]

    def _search(self, x2: torch.Tensor, w: Int4Weight, mb: int, laid: Int4Weight | None = None,
                layout: str = "canonical", sz: torch.Tensor | None = None, key: str = "") -> Config:
        m, k = x2.shape
        xb = torch.randn((mb, k), device=x2.device, dtype=x2.dtype)
        out = torch.empty((mb, w.out_features), device=x2.device, dtype=x2.dtype)
        timing = settings.TUNE_TIMING
        timed: list[tuple[Config, float]] = []
        runs = {}
        for cfg in candidate_configs(mb, w.out_features, k, w.group_size, layout):
            # Zeroed once: split-K launches leave their tile counters zeroed again.
            cnt = None if cfg == DEQUANT_CUBLAS else torch.zeros(
                counter_slots(cfg, mb, w.out_features), device=x2.device, dtype=torch.int32)
            try:
                run = self.run_candidate(cfg, xb, out, cnt, w, laid, layout, sz)
                if run is None:
                    continue
                t = time_ms(run, x2.device, timing, warmup=2, rep_ms=8)
            except (triton.runtime.errors.OutOfResources, RuntimeError, triton.compiler.errors.CompilationError):
                continue  # too much shared memory or registers for this tile: not a candidate
            timed.append((cfg, t))
            runs[cfg] = run
        if not timed:
            raise RuntimeError(f"no Triton configuration runs for M={mb}, N={w.out_features}, K={k}")
        # the front of the field timed again in turns (kernels/tuning.py): one pass's order moves
        best, again = pick_fastest(timed, lambda c: time_ms(runs[c], x2.device, timing, warmup=1, rep_ms=4))
        release(x2.device)
        log_search(key, timed, again, best)
        return best

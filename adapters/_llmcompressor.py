"""Drive llm-compressor's one-shot GPTQ / AWQ on a copy of a model; read back canonical INT4.

llm-compressor (vLLM project) is the maintained home of both algorithms: auto-gptq and
autoawq are archived, and GPTQModel 7.x needs torch >= 2.14.1 (docs/backends.md). After
`oneshot`, every quantized linear carries `weight_scale` and `weight_zero_point` (signed
zero-points, codes in [-8, 7]) and, with act-order "group", `weight_g_idx`; canonical codes
are those + 8.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import tempfile
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

import torch
from torch import nn

from quantbridge.formats.int32pack import perm_from_g_idx
from quantbridge.plugin.availability import Availability, pip_extra
from quantbridge.plugin.packed import Int4Weight, canonical_perm, pack_int4
from quantbridge.plugin.quantizer import Calibration
from quantbridge.plugin.spec import QuantSpec

# Calibrate every layer on the unquantized model's activations: the same inputs the isolated error
# is measured on, so GPTQ minimises exactly what quantbridge reports per layer.
QUANTIZATION_AWARE = False
INSTALL_HINT = pip_extra("gptq")  # llmcompressor
# Its per-layer INFO logs and import-time device warnings would bury quantbridge's output; read
# when llmcompressor is first imported (lazily, by gptq/awq when they calibrate).
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")


def availability(device: torch.device) -> Availability:
    try:
        v = version("llmcompressor")
    except PackageNotFoundError:
        return Availability(False, "llmcompressor is not installed")
    # Metadata and find_spec only: importing llmcompressor takes seconds (`quantbridge env`
    # need not); an incompatible install then fails when it calibrates, recorded as that row's failure.
    if find_spec("llmcompressor") is None:
        return Availability(False, f"llmcompressor {v} has metadata but no importable package; reinstall it")
    return Availability(True, f"llmcompressor {v}")


def scheme(spec: QuantSpec) -> dict:
    """compressed-tensors weight args for the spec."""
    return {"num_bits": 4, "type": "int", "symmetric": spec.symmetric,
            "strategy": "channel" if spec.group_size == -1 else "group",
            "group_size": None if spec.group_size == -1 else spec.group_size}


def oneshot(model: nn.Module, linears: dict[str, nn.Linear], calib: Calibration, recipe) -> nn.Module:
    """Run the recipe on a deep copy (the caller's model is left as it was); return the copy."""
    from datasets import Dataset
    from llmcompressor import oneshot as run

    work = copy.deepcopy(model).float()  # the algorithms solve in fp32; weights are rounded per spec below
    ids = calib.input_ids
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    _quiet()
    with tempfile.TemporaryDirectory() as cfg_dir, _no_pinning_without_accelerator(), _tqdm_into(calib.progress):
        # llm-compressor re-reads the config from name_or_path and would otherwise build a
        # processor from it too; in-memory models have no such path, so give it both.
        work.config.save_pretrained(cfg_dir)
        work.config._name_or_path = cfg_dir
        run(model=work, dataset=ds, recipe=recipe, processor=calib.tokenizer, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            quantization_aware_calibration=QUANTIZATION_AWARE)
    missing = [n for n in linears if not hasattr(work.get_submodule(n), "weight_scale")]
    if missing:
        raise RuntimeError(f"llm-compressor left {len(missing)} target layers unquantized, e.g. {missing[0]}")
    return work


def read_int4(module: nn.Linear, group_size: int, scale_dtype: torch.dtype) -> Int4Weight:
    """Canonical weight from a quantized module: codes = round(w / s) + zp + 8, clamped."""
    w = module.weight.detach().float()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    s = module.weight_scale.detach().float().reshape(n, -1)
    zp = getattr(module, "weight_zero_point", None)
    zp = torch.zeros_like(s) if zp is None else zp.detach().float().reshape(n, -1)
    g_idx = getattr(module, "weight_g_idx", None)
    cols = torch.arange(k) // g if g_idx is None else g_idx.detach().long().cpu()
    codes = torch.clamp(torch.round(w / s[:, cols]) + zp[:, cols], -8, 7) + 8
    perm = None if g_idx is None else perm_from_g_idx(g_idx.cpu(), g)
    if perm is not None:
        codes = codes[:, perm]
    return canonical_perm(Int4Weight(pack_int4(codes.to(torch.uint8)), s.to(scale_dtype),
                                     (zp + 8).to(torch.uint8), g, perm))


SUBGRAPH = re.compile(r"^\((\d+)/(\d+)\): Calibrating")


@contextlib.contextmanager
def _tqdm_into(progress):
    """llm-compressor draws a tqdm bar per pipeline stage; quantbridge shows its own progress.

    Its bars stay hidden, but the sequential pipeline's "(i/N): Calibrating" stages (one per
    decoder layer) drive quantbridge's bar, so a long calibration shows how far it is and
    its ETA.
    """
    from tqdm import tqdm

    original = tqdm.__init__
    seen = set()

    def init(self, *args, **kwargs):
        m = SUBGRAPH.match(str(kwargs.get("desc") or ""))
        if m and progress is not None:
            i, n = int(m.group(1)), int(m.group(2))
            if not seen:
                progress.begin(f"layer groups of {n}", n)
            elif i not in seen:
                progress.advance()  # the previous group is done
            seen.add(i)
        original(self, *args, **{**kwargs, "disable": True})

    tqdm.__init__ = init
    try:
        yield
    finally:
        tqdm.__init__ = original
        if seen and progress is not None:
            progress.advance()  # the last group


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies, which
    raises on a machine without an accelerator. Pinning changes no value, so skip it there."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available() or not hasattr(IntermediatesCache, "pin_memory"):
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _quiet() -> None:
    """llm-compressor logs every layer at INFO through loguru and draws its own tqdm bars;
    keep the terminal for quantbridge's progress."""
    try:
        from loguru import logger

        logger.remove()
        logger.add(lambda m: None, level="WARNING")
    except ImportError:
        pass
    logging.getLogger("llmcompressor").setLevel(logging.WARNING)
    # Its sequential pipeline traces the model with torch.fx, which warns about its own API once per trace.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def ignored(model: nn.Module, linears: dict[str, nn.Linear]) -> list[str]:
    """Every linear of the model that is not a target, for the recipe's `ignore`."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears]

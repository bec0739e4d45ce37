"""Quantized checkpoints: read any supported INT4 layout, write any, losslessly.

A checkpoint is a Hugging Face model directory whose config.json carries a
`quantization_config`; quantized linears store their format's tensors under the module path
(`model.layers.0.self_attn.q_proj.qweight`, ...), everything else is stored as usual.
Reading never goes through a quantization library: the codecs in quantbridge.formats
decode the tensors to the canonical Int4Weight.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from quantbridge import formats
from quantbridge.files import faults
from quantbridge.files.outdir import exchange, refuse_unsafe
from quantbridge.models.loaded import LoadedModel, dir_hash, linear_layers, refuse_mismatched
from quantbridge.models.localdir import check_local_model, read_config
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.packed import Int4Weight, cast_scales
from quantbridge.plugin.spec import QuantSpec

WEIGHTS_FILE = "model.safetensors"


# Older checkpoints keep the quantization settings beside config.json instead of in it.
_SIDECARS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}  # auto-gptq, AutoAWQ


def quantization_config(path: Path) -> dict | None:
    cfg = read_config(Path(path))
    if cfg.get("quantization_config") is not None:
        return cfg["quantization_config"]
    for name, method in _SIDECARS.items():
        side = Path(path) / name
        if side.exists():
            try:
                return {"quant_method": method, **json.loads(side.read_text())}
            except (ValueError, TypeError) as e:
                raise UserError(f"{side} is not a JSON object ({e}); fix or remove it") from None
    return None


def is_quantized(path: Path) -> bool:
    return quantization_config(path) is not None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors files; quantbridge reads safetensors checkpoints")
    from safetensors import SafetensorError

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{f} is truncated or corrupt ({first}); re-download or re-save the checkpoint") from None
    return out


def read_int4(path: Path) -> tuple[formats.Codec, dict, dict[str, Int4Weight], dict[str, torch.Tensor]]:
    """(codec, quantization_config, quantized layers, the remaining plain tensors)."""
    qcfg = quantization_config(path)
    codec = formats.detect(qcfg)
    tensors = _tensors(path)
    prefixes = codec.layer_prefixes(list(tensors))
    if not prefixes:
        raise UserError(f"{path}: quantization_config says {codec.name} but no layer carries "
                        f"'{codec.suffixes[0]}' tensors")
    weights, used = {}, set()
    for p in prefixes:
        parts = {s: tensors[f"{p}.{s}"] for s in codec.suffixes if f"{p}.{s}" in tensors}
        used.update(f"{p}.{s}" for s in parts)
        try:
            weights[p] = codec.decode(parts, qcfg)
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: layer {p} could not be decoded as {codec.name}: {e}") from None
    rest = {k: v for k, v in tensors.items() if k not in used}
    return codec, qcfg, weights, rest


def load_quantized(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The model with every quantized linear holding its dequantized weight, plus the INT4 weights.

    The dequantized model is the comparison's reference: every backend then runs the very
    same INT4 weights, and its error is its kernel's alone.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    check_local_model(Path(path))  # config, weight headers and tokenizer files, each named if bad
    codec, qcfg, weights, rest = read_int4(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # quantbridge decodes the layers itself
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lins = linear_layers(model)
    unknown = [p for p in weights if p not in lins]
    if unknown:
        raise UserError(f"{path}: quantized tensors for {unknown[0]}, which is not a linear layer of "
                        f"{type(model).__name__}")
    expected = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in rest.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    mismatched += [(f"{n}.weight", (w.out_features, w.in_features), tuple(lins[n].weight.shape))
                   for n, w in weights.items() if (w.out_features, w.in_features) != tuple(lins[n].weight.shape)]
    if mismatched:  # load_state_dict would raise a RuntimeError listing them all

        refuse_mismatched(sorted(mismatched), Path(path), str(path))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.removesuffix(".weight") not in weights]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected tensor {unexpected[0]}"
        raise UserError(f"{path}: checkpoint {what}; is it a {type(model).__name__} checkpoint?")
    scale_dtypes = sorted({str(w.scales.dtype).removeprefix("torch.") for w in weights.values()})
    for name, w in weights.items():
        lins[name].weight.data = w.dequantize(dtype)
        weights[name] = cast_scales(w, dtype).to(device)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = {"name": str(path), "source": str(Path(path).resolve()), "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "hash": dir_hash(Path(path)),
            "checkpoint": {"format": codec.name, "quantized_layers": len(weights), "scales_dtype": scale_dtypes,
                           "quantization_config": qcfg}}
    return LoadedModel(name=str(path), source=info["source"], model=model, tokenizer=tokenizer, info=info, int4=weights)


_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
# The files convert wrote, listed in the checkpoint: --overwrite removes those and nothing else.
MANIFEST = ".quantbridge-checkpoint"
# What convert writes in any layout, for a checkpoint without a manifest (an older quantbridge's):
# the weights, config.json and the files a tokenizer's save_pretrained writes.
_CONVERT_FILES = {WEIGHTS_FILE, "config.json", MANIFEST, "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                  "chat_template.jinja", "chat_template.json"}


def _written_by_convert(path: Path) -> set[str]:
    """The names in checkpoint `path` that convert wrote (its manifest, else the names convert writes)."""
    try:
        listed = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        if isinstance(listed, list) and all(isinstance(n, str) for n in listed):
            return set(listed) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return set(_CONVERT_FILES)


def _not_written_by_convert(path: Path) -> list[str]:
    ours = _written_by_convert(path)
    return sorted(p.name for p in path.iterdir() if p.name not in ours or not p.is_file() or p.is_symlink())


def remove_checkpoint(path: Path) -> list[str]:
    """Remove what convert wrote in `path`, then `path` if that empties it; return what was left."""
    ours = _written_by_convert(path)
    for p in path.iterdir():
        if p.name in ours and p.is_file() and not p.is_symlink():
            p.unlink()
    left = sorted(p.name for p in path.iterdir())
    if not left:
        path.rmdir()
    return left


def _is_checkpoint(path: Path) -> bool:
    """A Hugging Face / quantbridge model directory: a config.json naming a model, weights, no subdirectories."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and bool(cfg.get("model_type") or cfg.get("architectures"))
            and any(any(path.glob(g)) for g in _WEIGHT_GLOBS) and not any(p.is_dir() for p in path.iterdir()))


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> tuple[Path, list[str]]:
    """OUT resolved and checked before any work; (path, the files --overwrite will replace).

    Refuses /, the home directory, the current directory or any directory containing it, and
    a non-empty directory that is not a model checkpoint, with --overwrite or without.
    """
    path = Path(out).expanduser().resolve()
    refuse_unsafe(path, "OUT_DIR", "runs/demo-gptq")
    if path.exists() and not path.is_dir():
        raise UserError(f"OUT_DIR {out} is a file, not a directory; choose a new directory for the checkpoint")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries:
        _check_swap(path, out)
        return path, []
    if not _is_checkpoint(path):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"OUT_DIR {out} is not empty and is not a model checkpoint ({shown}); --overwrite replaces "
                        f"checkpoints only: choose a new directory")
    foreign = _not_written_by_convert(path)
    if foreign:  # replacing the checkpoint must not take the user's own files with it
        raise UserError(f"OUT_DIR {out} holds a checkpoint and files convert did not write ({', '.join(foreign)}); "
                        f"convert replaces only what it wrote: move them away or choose another OUT_DIR")
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} files)" if len(entries) > 6 else "")
    if not overwrite:
        raise UserError(f"OUT_DIR {out} is not empty: it holds a checkpoint ({shown}); pass --overwrite to replace it, "
                        f"or choose another OUT_DIR")
    _check_swap(path, out)
    return path, entries


def _check_swap(path: Path, out) -> None:
    """What the final swap needs, tried now: a rename in OUT_DIR's parent (or the nearest directory
    that exists), and an OUT_DIR and files that can be moved and removed (no mount point, not immutable)."""
    parent = next(p for p in path.parents if p.is_dir())
    problem = None
    try:
        faults.probe_dir(parent, 1 << 20)  # a full disk or `ulimit -f` shows now, not after quantizing
    except OSError as e:
        problem, where = e, parent
    for p in [path, *sorted(path.iterdir())] if path.is_dir() and problem is None else []:
        problem, where = faults.replace_problem(p), p
        if problem is not None:
            break
    if problem is not None:
        raise UserError(f"OUT_DIR {out} cannot be written: {where}: {problem.strerror} "
                        f"({errno.errorcode.get(problem.errno, '?')}); {faults.os_error_hint(problem)}")


def save_quantized(out: Path, model: nn.Module, tokenizer, weights: dict[str, Int4Weight], codec: formats.Codec,
                   spec: QuantSpec, overwrite: bool = False) -> Path:
    """Write a loadable checkpoint; the directory appears whole or not at all."""
    from safetensors.torch import save_file

    out, _ = check_out_dir(out, overwrite)
    # The metadata describes the tensors: act-order (desc_act, refused by vLLM 0.32) only where a layer has one.
    spec = replace(spec, act_order=any(w.perm is not None for w in weights.values()))
    codec = codec.for_checkpoint(spec)  # e.g. GPTQ: v1 when symmetric, v2 when not (formats/gptq.py)
    smoothed = [n for n, w in weights.items() if w.smoothed]
    if smoothed:
        raise ValueError(f"{smoothed[0]} carries unfolded smoothing factors; fold them into the model first")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in model.state_dict().items():
        module, _, leaf = k.rpartition(".")
        if module in weights and leaf != "bias":  # the float weight and any quantizer state
            continue
        if t.data_ptr() in seen:  # tied weights are stored once; transformers re-ties them
            continue
        seen.add(t.data_ptr())
        tensors[k] = t.detach().cpu().contiguous()
    for name, w in weights.items():
        try:
            enc = codec.encode(w.to("cpu"))
        except ValueError as e:
            raise UserError(f"cannot write {name} as {codec.name}: {e}") from None
        tensors.update({f"{name}.{s}": t.contiguous() for s, t in enc.items()})
    skipped = [n for n in linear_layers(model) if n not in weights]
    config = model.config.to_dict()
    config["quantization_config"] = codec.quantization_config(spec, skipped)
    if any(w.offsets is not None for w in weights.values()):  # readers that do not take them must refuse
        config["quantization_config"]["float_offsets"] = True
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _usual_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600: a server running as another user could not read it
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"files": files}) + "\n")
        faults.stage("convert-written")  # test hook: a signal before the swap
    except BaseException as e:  # a write that failed, or a signal: the half-written copy goes, OUT_DIR is as it was
        shutil.rmtree(tmp, ignore_errors=True)
        cause = faults.os_error_of(e) if isinstance(e, Exception) else None  # safetensors: "(os error 28)"
        if cause is not None:
            raise faults.WriteFailed(tmp, cause, "the new checkpoint beside OUT_DIR") from None
        raise
    _swap_in(tmp, out)
    return out


def _usual_mode(path: Path) -> None:
    """The mode the umask gives a new file (usually 0644), as every other file of the checkpoint has."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the checkpoint written at `tmp` in OUT's place; a previous checkpoint (check_out_dir) is
    exchanged with it in one step and then removed. A signal meanwhile is acted on once that is done,
    so OUT holds either the previous checkpoint or the new one, and nothing hidden is left."""
    try:
        with faults.deferred_signals():
            try:
                if out.exists():
                    exchange(tmp, out)  # the previous checkpoint now lies at `tmp`
                else:
                    os.replace(tmp, out)
            except OSError as e:  # OUT_DIR as it was; our new copy goes
                shutil.rmtree(tmp, ignore_errors=True)
                raise faults.WriteFailed(out, e, "the new checkpoint, moving it into") from None
            if tmp.exists():
                faults.stage("convert-swap")  # test hook: a signal during the swap
                _remove_previous(tmp, out)
    except KeyboardInterrupt as e:
        stop = faults.as_interrupted(e)
        stop.state = f"{out} holds the new checkpoint, complete; nothing else was left behind"
        raise stop from None


def _remove_previous(previous: Path, out: Path) -> None:
    """Remove the previous checkpoint's files; what cannot go (not ours, or failing) stays in view."""
    try:
        left = remove_checkpoint(previous)
    except OSError as e:
        left = [f"{e.filename or previous}: {e.strerror}"]
    if left:
        kept = out.with_name(f"{out.name}.previous")
        try:
            os.rename(previous, kept)
        except OSError:
            kept = previous
        print(f"warning: the previous checkpoint held files convert did not write or could not remove "
              f"({', '.join(left)}); they are in {kept}", file=sys.stderr)


def spec_of(weights: dict[str, Int4Weight]) -> QuantSpec:
    """The spec a set of decoded weights follows (what a converted checkpoint declares)."""
    w = next(iter(weights.values()))
    per_channel = all(x.group_size == x.in_features for x in weights.values())
    symmetric = all(bool((x.zeros == 8).all()) for x in weights.values())
    return QuantSpec(group_size=-1 if per_channel else w.group_size, symmetric=symmetric,
                     act_order=any(x.perm is not None for x in weights.values()))

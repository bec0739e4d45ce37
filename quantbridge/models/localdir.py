"""Checks on a local model directory before anything loads it: config, weight headers, tokenizer.

Both loaders use them (models.py for float models, checkpoint.py for quantized ones).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantbridge.plugin.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")


def read_config(path: Path) -> dict:
    """A model directory's config.json as a dict; a one-line error naming the file otherwise."""
    f = Path(path) / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e}); fix the file or re-save the model (save_pretrained)") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} holds a JSON {type(cfg).__name__}, not an object; re-save the model (save_pretrained)")
    return cfg


def check_local_model(path: Path) -> dict:
    """Before transformers reads a local directory: config, weight files' headers, tokenizer files."""
    cfg = read_config(path)
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is truncated or corrupt ({_first_line(e)}); re-download or re-save the model") from None
    if not any((Path(path) / n).exists() for n in TOKENIZER_FILES) and not any(Path(path).glob("*.tiktoken")):
        raise UserError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                        f"model's tokenizer next to it: tokenizer.save_pretrained(DIR)")
    return cfg


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

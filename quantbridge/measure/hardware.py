"""Facts about the machine a result was measured on: device, driver, clocks, library versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from quantbridge.plugin.errors import UserError

LIBRARIES = ("torch", "transformers", "triton", "bitsandbytes", "llmcompressor", "compressed-tensors", "gptqmodel", "vllm")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_facts(index: int = 0) -> dict:
    """Driver, clocks, power and temperature from NVML; {'nvml': reason} when unavailable."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"nvml": f"unavailable: {e}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        facts = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in facts.items()}
    except pynvml.NVMLError as e:
        return {"nvml": f"query failed: {e}"}
    finally:
        pynvml.nvmlShutdown()


def device_info(device: torch.device) -> dict:
    info: dict = {
        "type": device.type,
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_cuda": torch.version.cuda,
        "libraries": library_versions(),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=getattr(props, "L2_cache_size", None),
            **nvml_facts(idx),
        )
    else:
        info.update(name=info["cpu"], threads=torch.get_num_threads())
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but torch {torch.__version__} sees no GPU; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        # CPU half-precision matmuls are emulated and slow: fp32 there is the honest reference.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise UserError(f"unknown --dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]

"""`--quantization quantbridge`: vLLM's QuantizationConfig and linear method for quantbridge checkpoints.

The checkpoint is what `quantbridge convert MODEL --to native OUT` writes: per linear,
`qweight` uint8 [N, K/2] (two codes per byte along K), `scales` [N, K/g] and `zeros` uint8
[N, K/g]. vLLM's parameter classes shard them: column-parallel layers (and the fused
q/k/v and gate/up ones) along N, row-parallel layers along K (the packed dim, halved).
After loading, each layer's shard becomes a canonical Int4Weight and the chosen
quantbridge backend builds its kernel from it (`Backend.from_int4`): the checkpoint's
`backend`, or QUANTBRIDGE_BACKEND to run the same weights through another kernel.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from quantbridge.plugin import backend as registry
from quantbridge.plugin import resolve
from quantbridge.plugin.packed import Int4Weight
from quantbridge.vllm import graphs
from quantbridge.vllm import profiler as prof
from quantbridge.vllm.runtime import add_layer, run

logger = init_logger(__name__)

NAME = "quantbridge"
ENV_BACKEND = "QUANTBRIDGE_BACKEND"


@register_quantization_config(NAME)
class QuantbridgeConfig(QuantizationConfig):
    def __init__(self, group_size: int, symmetric: bool, backend: str, ignore: list[str]) -> None:
        super().__init__()
        self.group_size = group_size
        self.symmetric = symmetric
        self.backend = os.environ.get(ENV_BACKEND) or backend
        self.ignore = ignore
        runnable = resolve.int4_runners()
        registry.get(self.backend)  # unknown name: a one-line error listing the known ones
        if self.backend not in runnable:
            raise ValueError(f"quantbridge backend {self.backend!r} cannot run INT4 checkpoint weights; "
                             f"set {ENV_BACKEND} to one of {', '.join(runnable)}")

    def __repr__(self) -> str:
        return f"QuantbridgeConfig(group_size={self.group_size}, symmetric={self.symmetric}, backend={self.backend})"

    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernel's tensor-core tiles

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantbridgeConfig":
        if config.get("bits", 4) != 4:
            raise ValueError(f"quantbridge checkpoints are 4-bit; this one says bits={config.get('bits')}")
        if config.get("float_offsets"):
            raise ValueError("this quantbridge checkpoint holds float offsets per group (converted from GGUF "
                             "Q4_1/Q4_K); the vLLM plugin serves integer zero-points only")
        if config.get("act_order"):
            raise ValueError("act-order quantbridge checkpoints cannot be served by vLLM: fused q/k/v and gate/up "
                             "layers need one input order; convert without act-order")
        return cls(int(config["group_size"]), bool(config.get("symmetric", False)),
                   config.get("backend", "native"), list(config.get("ignore", [])))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        if is_layer_skipped(prefix, self.ignore, self.packed_modules_mapping):
            return UnquantizedLinearMethod()
        return QuantbridgeLinearMethod(self, prefix)


class QuantbridgeLinearMethod(LinearMethodBase):
    def __init__(self, config: QuantbridgeConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        g = input_size_per_partition if self.config.group_size == -1 else self.config.group_size
        if input_size_per_partition % g:
            raise ValueError(f"{self.prefix}: in-features per rank {input_size_per_partition} is not a multiple of the "
                             f"group size {g}; use a smaller tensor-parallel size or re-convert with another group size")
        n = sum(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        qweight = PackedvLLMParameter(data=torch.empty(n, input_size_per_partition // 2, dtype=torch.uint8),
                                      input_dim=1, output_dim=0, packed_dim=1, packed_factor=2, weight_loader=loader)
        groups = input_size_per_partition // g
        scales = GroupQuantScaleParameter(data=torch.empty(n, groups, dtype=params_dtype), input_dim=1, output_dim=0,
                                          weight_loader=loader)
        zeros = GroupQuantScaleParameter(data=torch.empty(n, groups, dtype=torch.uint8), input_dim=1, output_dim=0,
                                         weight_loader=loader)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.register_parameter("zeros", zeros)
        layer.qb_group_size = g

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = Int4Weight(layer.qweight.data, layer.scales.data, layer.zeros.data, layer.qb_group_size, None)
        kernel = registry.get(self.config.backend).from_int4(w, None)
        for name in ("qweight", "scales", "zeros"):  # plain tensors from here on; the kernel owns them
            # A kernel that stores one of these itself, re-laid (native's operand layout), holds the
            # one copy: the layer points at it rather than keep the loaded one beside it.
            own, held = getattr(kernel, name, None), getattr(layer, name).data
            keep = own if isinstance(own, torch.Tensor) and own.shape == held.shape and own.dtype == held.dtype else held
            param = nn.Parameter(keep, requires_grad=False)
            param.weight_loader = _reload_refused  # vLLM's loaders call this: loud, not a silent misread
            setattr(layer, name, param)
        layer.qb_index = add_layer(self.prefix, kernel)
        p = prof.profiler()
        if p is not None:
            graphs.install()  # the second model runner's graph manager is loaded by now
            p.meta.update(_meta(self.config))
            p.describe(self.prefix, shape=[kernel.out_features, kernel.in_features], kernel=kernel.kernel,
                       weight_bytes=kernel.weight_nbytes)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = run(x.reshape(-1, x.shape[-1]), layer.qb_index)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _reload_refused(param: nn.Parameter, loaded_weight: torch.Tensor, *args, **kwargs) -> None:
    raise RuntimeError("quantbridge: after loading, a layer's INT4 codes belong to its kernel (which may keep "
                       "them re-laid); reloading weights in place is not supported: start the server again "
                       "with the new checkpoint")


def _meta(config: QuantbridgeConfig) -> dict:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no distributed state (a bare unit test)
        rank, size = 0, 1
    graph = {}
    try:
        from vllm.config import get_current_vllm_config

        cfg = get_current_vllm_config()
        model = cfg.model_config.model
        graph = {"cudagraph_mode": str(cfg.compilation_config.cudagraph_mode),
                 "enforce_eager": bool(cfg.model_config.enforce_eager)}
    except Exception:  # noqa: BLE001 - outside a vLLM config context
        model = "served model"
    import vllm

    return {"backend": config.backend, "model": model, "tp_rank": rank, "tp_size": size,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "vllm": getattr(vllm, "__version__", "?"), **graph}

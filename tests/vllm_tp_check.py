"""Runs inside the vLLM environment (tests/test_vllm.py): tensor-parallel sharding of the packed
quantbridge tensors through vLLM's own parameter loaders, rank by rank, for TP = 2 and 4.

Column-parallel (and merged gate/up) layers split N; row-parallel layers split K, the packed
dim. Each rank's layer runs its shard through the native kernel; the ranks' outputs,
concatenated (column) or summed (row), must equal x @ dequant(W).T computed in float64 from
the full checkpoint tensors. Prints one line per case; exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys

import torch
import vllm.model_executor.parameter as vparam
from torch import nn

from quantbridge.formats import get as get_codec
from quantbridge.plugin.packed import quantize_rtn
from quantbridge.plugin.spec import QuantSpec
from quantbridge.vllm.method import QuantbridgeConfig, QuantbridgeLinearMethod

K, G = 1024, 128
TOL = 1e-5  # relative L2: float32 accumulation over K = 1024 against float64


def _set_rank(rank: int, size: int) -> None:
    # vLLM's parameters read the rank at construction; a single process plays each rank in turn.
    vparam.get_tensor_model_parallel_rank = lambda: rank
    vparam.get_tensor_model_parallel_world_size = lambda: size


def _checkpoint(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, K, generator=gen) * 0.05
    q = quantize_rtn(w, QuantSpec(group_size=G))
    return get_codec("native").encode(q), q.dequantize(torch.float64)


def _layer(method: QuantbridgeLinearMethod, k_part: int, n_parts: list[int]) -> nn.Module:
    layer = nn.Module()
    method.create_weights(layer, k_part, n_parts, K, sum(n_parts), torch.float32, weight_loader=lambda *a: None)
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> int:
    cfg = QuantbridgeConfig(group_size=G, symmetric=False, backend="native", ignore=[])
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(1))
    failures = 0
    for tp in (2, 4):
        # column parallel: N split
        tensors, deq = _checkpoint(512, seed=tp)
        outs = []
        for r in range(tp):
            _set_rank(r, tp)
            m = QuantbridgeLinearMethod(cfg, f"col.tp{tp}")
            layer = _layer(m, K, [512 // tp])
            for name, t in tensors.items():
                getattr(layer, name).load_column_parallel_weight(t)
            m.process_weights_after_loading(layer)
            outs.append(m.apply(layer, x))
        err = _rel(torch.cat(outs, dim=1), x.double() @ deq.T)
        # row parallel: K split (qweight's packed dim halves the shard)
        routs = []
        for r in range(tp):
            _set_rank(r, tp)
            m = QuantbridgeLinearMethod(cfg, f"row.tp{tp}")
            layer = _layer(m, K // tp, [512])
            for name, t in tensors.items():
                getattr(layer, name).load_row_parallel_weight(t)
            m.process_weights_after_loading(layer)
            routs.append(m.apply(layer, x[:, r * K // tp:(r + 1) * K // tp]))
        rerr = _rel(torch.stack(routs).sum(0), x.double() @ deq.T)
        # merged column (gate_up): two logical weights of different N fused per rank
        (gate, gdeq), (up, udeq) = _checkpoint(256, seed=10 + tp), _checkpoint(384, seed=20 + tp)
        mouts = []
        for r in range(tp):
            _set_rank(r, tp)
            m = QuantbridgeLinearMethod(cfg, f"merged.tp{tp}")
            layer = _layer(m, K, [256 // tp, 384 // tp])
            for i, part in enumerate((gate, up)):
                offset, size = (0, 256 // tp) if i == 0 else (256 // tp, 384 // tp)
                for name, t in part.items():
                    getattr(layer, name).load_merged_column_weight(t, shard_id=i, shard_offset=offset, shard_size=size)
            m.process_weights_after_loading(layer)
            y = m.apply(layer, x)
            mouts.append((y[:, :256 // tp], y[:, 256 // tp:]))
        merr = max(_rel(torch.cat([o[0] for o in mouts], 1), x.double() @ gdeq.T),
                   _rel(torch.cat([o[1] for o in mouts], 1), x.double() @ udeq.T))
        for kind, e in (("column", err), ("row", rerr), ("merged column", merr)):
            ok = e < TOL
            failures += not ok
            print(f"tp={tp} {kind}: rel error {e:.2e} ({'ok' if ok else 'FAIL'}, tolerance {TOL})")
    # a group size that does not divide the per-rank in-features is refused with the fix named
    _set_rank(0, 16)
    try:
        _layer(QuantbridgeLinearMethod(cfg, "bad"), K // 16, [512])
        print("group check: FAIL (no error)")
        failures += 1
    except ValueError as e:
        print(f"group check: ok ({e})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

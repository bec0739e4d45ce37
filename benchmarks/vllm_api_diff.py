"""The vLLM APIs quantbridge's plugin uses, compared between two vLLM source trees.

usage: python benchmarks/vllm_api_diff.py OLD_SITE NEW_SITE
OLD_SITE and NEW_SITE hold a `vllm/` package each (a site-packages, or a wheel unzipped: only its
.py files are read, nothing is imported, so a vLLM built for another torch can be checked here).
For each class or function the plugin calls (quantbridge/vllm/*.py) it prints "same", or
"DIFFERS" and a diff: a function's whole source; a class's bases, method signatures and class
attributes. A body that differs (execute_model between releases) needs reading, not a refusal:
the plugin relies on the signatures and the fields named in quantbridge/vllm/graphs.py.
"""

from __future__ import annotations

import ast
import difflib
import sys
from pathlib import Path

TARGETS = {
 "vllm/compilation/cuda_graph.py": ["CUDAGraphWrapper.__call__", "CUDAGraphWrapper.__init__"],
 "vllm/forward_context.py": ["get_forward_context", "is_forward_context_available", "ForwardContext", "BatchDescriptor"],
 "vllm/model_executor/layers/linear.py": ["LinearMethodBase", "LinearBase.__init__"],
 "vllm/model_executor/layers/quantization/__init__.py": ["register_quantization_config"],
 "vllm/model_executor/layers/quantization/base_config.py": ["QuantizationConfig", "QuantizeMethodBase"],
 "vllm/model_executor/layers/quantization/utils/quant_utils.py": ["is_layer_skipped"],
 "vllm/model_executor/parameter.py": ["PackedvLLMParameter.__init__", "GroupQuantScaleParameter", "_ColumnvLLMParameter.__init__", "RowvLLMParameter.__init__", "BasevLLMParameter.__init__"],
 "vllm/v1/worker/gpu/cudagraph_utils.py": ["CudaGraphManager.capture", "CudaGraphManager.run_fullgraph", "ModelCudaGraphManager.run_fullgraph", "BatchExecutionDescriptor"],
 "vllm/v1/worker/gpu/model_runner.py": ["GPUModelRunner.execute_model"],
 "vllm/config/compilation.py": ["CUDAGraphMode"],
 "vllm/config/vllm.py": ["get_current_vllm_config"],
 "vllm/distributed/parallel_state.py": ["get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"],
}

def find(tree: ast.AST, dotted: str) -> ast.AST | None:
    node = tree
    for part in dotted.split("."):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and ch.name == part:
                node = ch; break
        else:
            return None
    return node


def shape(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ClassDef):  # methods' signatures and the class's own assignments
        out = [f"class {node.name}({', '.join(ast.unparse(b) for b in node.bases)})"]
        for ch in node.body:
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append(f"  def {ch.name}({ast.unparse(ch.args)})")
            elif isinstance(ch, (ast.AnnAssign, ast.Assign)):
                out.append("  " + ast.unparse(ch))
        return out
    return ast.unparse(node).splitlines()


def main(a_site: Path, b_site: Path) -> None:
    for f, names in TARGETS.items():
        ta, tb = (ast.parse((p / f).read_text()) for p in (a_site, b_site))
        for n in names:
            a, b = find(ta, n), find(tb, n)
            if a is None or b is None:
                print(f"== {f}:{n} MISSING in {'A' if a is None else 'B'}"); continue
            la, lb = shape(a), shape(b)
            if la == lb:
                print(f"== {f}:{n} same")
            else:
                print(f"== {f}:{n} DIFFERS"); print("\n".join(list(difflib.unified_diff(la, lb, lineterm="", n=1))[2:60]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

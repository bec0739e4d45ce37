"""benchmarks/vllm_serve_gpu.py: servers held together take turns, and the overhead is read per cycle.

The servers are stand-ins (no vLLM here): each round's tokens/s comes from a machine whose speed
drifts through the run, with a known cost on the profiled server, so only a pairing that holds the
servers together recovers that cost.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path

from click.testing import CliRunner

from quantbridge.cli import cli
from quantbridge.vllm import stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_serve_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("vllm_serve_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while being defined
    spec.loader.exec_module(mod)
    return mod


def _stand_ins(mod, monkeypatch, cost: dict[str, float], drift: float):
    """start() gives servers named by setting; _round() answers from a drifting machine."""
    rng, turns = random.Random(), []

    def start(checkpoint, out_dir, profile, extra, every, gpu_mem):
        name = ("on" if every is None else f"on@{every}") if profile else "off"
        row = {"profile": profile, "log": name, "tokens_per_s": [], "tokens_per_s_single": [], "gpu_mem": gpu_mem}
        if every is not None:
            row["full_every"] = every
        return mod.Server(row, None, name)

    def round_(base, model, prompts):
        turns.append(base)
        speed = 8000.0 * (1 + drift * len(turns)) * (1 + rng.uniform(-0.003, 0.003))
        return speed * (1 - cost[base]) / (1 if len(prompts) > 1 else 16)

    monkeypatch.setattr(mod, "start", start)
    monkeypatch.setattr(mod, "_round", round_)
    monkeypatch.setattr(mod, "GAP_S", 0.0)
    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    return turns


def test_servers_held_together_take_turns_and_the_cost_is_read_per_cycle(tmp_path, monkeypatch):
    mod = _module()
    cost = {"off": 0.0, "on": random.uniform(0.02, 0.05), "on@1000000": random.uniform(0.0, 0.01)}
    turns = _stand_ins(mod, monkeypatch, cost, drift=0.002)  # 0.2 % a round: 11 % over the run
    monkeypatch.setenv("QB_SERVE_ORDER", "off+on+on@1000000")
    monkeypatch.setattr(mod.sys, "argv", ["vllm_serve_gpu.py", "ck", str(tmp_path), "9"])
    mod.main()
    # three warm-ups, then nine cycles of concurrent rounds and nine of single ones, the order rotating
    assert turns[:3] == ["off", "on", "on@1000000"]
    cycles = [turns[3 + 3 * i: 6 + 3 * i] for i in range(18)]
    assert cycles[0] == ["off", "on", "on@1000000"] and cycles[1] == ["on", "on@1000000", "off"]
    assert cycles[2] == ["on@1000000", "off", "on"] and cycles[3] == cycles[0]
    d = json.loads((tmp_path / "serve.json").read_text())
    assert [r["group"] for r in d["rows"]] == [0, 0, 0] and {r["gpu_mem"] for r in d["rows"]} == {"0.27"}
    paired = d["overhead"]["paired"]
    # within a cycle the machine drifts at most 0.4 %; the noise is ±0.3 % a round
    assert abs(paired["concurrent"]["change_pct"] + cost["on"] * 100) < 0.8
    assert abs(paired["single"]["change_pct"] + cost["on"] * 100) < 0.8
    assert paired["concurrent"]["cycles"] == 9 and paired["concurrent"]["q1_pct"] <= paired["concurrent"]["q3_pct"]
    twins = d["by_full_every"]["1000000"]["paired"]["concurrent"]
    assert abs(twins["change_pct"] + cost["on@1000000"] * 100) < 0.8
    # serve-stats reads what the harness wrote
    read = stats.overhead(tmp_path / "profile")
    assert read["paired"]["concurrent"]["cycles"] == 9
    assert read["by_full_every"]["1000000"]["paired"]["single"]["cycles"] == 9


def test_a_second_unprofiled_server_is_the_control(tmp_path, monkeypatch):
    """"off+on+off": the second unprofiled server against the first reads about zero, the profiled
    one its cost; single-request rounds may be fewer than the concurrent ones."""
    mod = _module()
    cost = random.uniform(0.02, 0.05)
    turns = _stand_ins(mod, monkeypatch, {"off": 0.0, "on": cost}, drift=0.002)
    monkeypatch.setenv("QB_SERVE_ORDER", "off+on+off")
    monkeypatch.setenv("QB_SERVE_SINGLE_ROUNDS", "5")
    monkeypatch.setattr(mod.sys, "argv", ["vllm_serve_gpu.py", "ck", str(tmp_path), "8"])
    mod.main()
    assert len(turns) == 3 + 3 * 8 + 3 * 5
    d = json.loads((tmp_path / "serve.json").read_text())
    assert [len(r["tokens_per_s"]) for r in d["rows"]] == [8, 8, 8]
    assert [len(r["tokens_per_s_single"]) for r in d["rows"]] == [5, 5, 5]
    o = d["overhead"]
    assert abs(o["paired"]["concurrent"]["change_pct"] + cost * 100) < 0.8
    assert abs(o["paired_control"]["concurrent"]["change_pct"]) < 0.8
    assert o["paired_control"]["single"]["cycles"] == 5 and o["rounds_off"] == 16
    read = stats.overhead(tmp_path / "profile")
    assert read["paired_control"]["concurrent"]["cycles"] == 8


def test_servers_run_one_after_another_are_not_paired(tmp_path, monkeypatch):
    mod = _module()
    _stand_ins(mod, monkeypatch, {"off": 0.0, "on": 0.03}, drift=0.0)
    monkeypatch.setenv("QB_SERVE_ORDER", "off,on")
    monkeypatch.setattr(mod.sys, "argv", ["vllm_serve_gpu.py", "ck", str(tmp_path), "5"])
    mod.main()
    d = json.loads((tmp_path / "serve.json").read_text())
    assert [r["group"] for r in d["rows"]] == [0, 1] and {r["gpu_mem"] for r in d["rows"]} == {"0.5"}
    assert "paired" not in d["overhead"] and abs(d["overhead"]["change_pct"] + 3.0) < 1.0
    # a later call's servers get groups of their own: rows of separate calls are never paired
    monkeypatch.setenv("QB_SERVE_ORDER", "off+on")
    mod.main()
    d = json.loads((tmp_path / "serve.json").read_text())
    assert [r["group"] for r in d["rows"]] == [0, 1, 2, 2] and d["overhead"]["paired"]["concurrent"]["cycles"] == 5


def test_serve_stats_prints_the_paired_overhead(tmp_path):
    d = _profile_dir(tmp_path)
    c, s = random.uniform(-5, -1), random.uniform(-3, 0)
    (d / "overhead.json").write_text(json.dumps({
        "tokens_per_s_off": 6000.0, "tokens_per_s_on": 5800.0, "source": "test",
        "paired": {"concurrent": {"change_pct": c, "q1_pct": c - 1, "q3_pct": c + 1, "cycles": 24},
                   "single": {"change_pct": s, "q1_pct": s - 1, "q3_pct": s + 1, "cycles": 24},
                   "broken": {"change_pct": "x"}}}))
    res = CliRunner().invoke(cli, ["serve-stats", str(d)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert f"servers held together, rounds taking turns: concurrent {c:+.1f} % per cycle (median; quartiles " \
           f"{c - 1:+.1f} … {c + 1:+.1f} %, 24 cycles)" in out
    assert f"single {s:+.1f} % per cycle" in out and "broken" not in out
    assert "control" not in out  # no control server in this run


def test_serve_stats_says_whether_the_control_resolves_the_cost(tmp_path):
    d = _profile_dir(tmp_path)
    # the control reads as no change (quartiles straddle zero, median under half the profiled one's), or not
    on, small, big = random.uniform(-4, -2), random.uniform(-0.5, 0.5), random.uniform(2.5, 5)

    def row(c: float, spread: float = 1.0) -> dict:
        return {"change_pct": c, "q1_pct": c - spread, "q3_pct": c + spread, "cycles": 24}
    # a wide control straddling zero still does not resolve a change of its own size
    for control, spread, word in ((small, 1.0, "resolved:"), (big, 1.0, "not resolved:"),
                                  (0.8 * on, 6.0, "not resolved:")):
        (d / "overhead.json").write_text(json.dumps({
            "tokens_per_s_off": 6000.0, "tokens_per_s_on": 5800.0, "source": "test",
            "paired": {"concurrent": row(on)}, "paired_control": {"concurrent": row(control, spread)}}))
        res = CliRunner().invoke(cli, ["serve-stats", str(d)])
        assert res.exit_code == 0, res.output
        out = " ".join(res.output.split())
        assert f"concurrent: {word}" in out and f"{control:+.1f} %" in out
        # the held-together figure comes first; the pooled medians follow, labelled as not held together
        assert out.index("servers held together") < out.index("pooled medians, servers not held together")
        assert ("not resolved" in out) == (word == "not resolved:")
        saved = json.loads((d / "results.json").read_text())  # the verdict is kept with the results
        assert saved["settings"]["profiling_overhead"]["resolved"] == {"concurrent": word == "resolved:"}


def _profile_dir(tmp_path):
    """A profile directory with one worker file of one layer, for serve-stats to read beside overhead.json."""
    d = tmp_path / "p"
    d.mkdir()
    (d / "worker-r0.json").write_text(json.dumps({
        "schema": 2, "pid": 1, "host": "h", "device": "cpu", "backend": "native", "flushes": 1,
        "flush_ms": {"count": 1, "total": 1.5, "max": 1.5}, "warmup_calls": {}, "graphs": {},
        "layers": {"a": {"shape": [8, 16], "kernel": "k", "weight_bytes": 64,
                         "m": {"1": {"count": 2, "total_us": 7.0, "min_us": 3.0, "max_us": 4.0,
                                     "samples_ns": [3000, 4000]}}}}}))
    return d

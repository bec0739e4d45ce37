"""The tuner's choice among candidates that time alike (kernels/tuning.py): which are timed again,
in what order, and which wins. Timings here are simulated (a first pass, then a drifting clock)."""

import random

import pytest

from quantbridge.kernels.tuning import finalists, pick_fastest


def test_finalists_are_the_front_of_the_field_fastest_first():
    first = [("c", 1.30), ("a", 1.00), ("d", 1.049), ("b", 1.02), ("e", 1.051)]
    assert finalists(first) == ["a", "b", "d"]  # e is 5.1 % behind, c 30 %
    assert finalists(first, limit=2) == ["a", "b"]
    assert finalists([]) == []


def test_a_lone_front_runner_is_not_timed_again():
    def never(c):
        raise AssertionError("timed again")

    best, times = pick_fastest([("a", 1.0), ("b", 1.5)], never)
    assert best == "a" and times == {}


def test_rounds_rotate_so_each_candidate_leads_in_turn():
    order = []

    def time_again(c):
        order.append(c)
        return 1.0

    pick_fastest([("a", 1.0), ("b", 1.01), ("c", 1.02)], time_again, rounds=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_the_median_over_rounds_beats_a_first_pass_that_drifted():
    """True times: b 2 % faster than a. The first pass timed a while the clock ran fast, so it ranked
    a first; in the rounds the clock drifts by up to 4 % from call to call, and b still wins."""
    rng = random.Random(20261207)
    true = {"a": 60.0, "b": 58.8, "c": 75.0}
    first = [("a", 58.5), ("b", 59.0), ("c", 75.0)]

    def time_again(c):
        return true[c] * (1.0 + rng.uniform(-0.02, 0.02))

    best, times = pick_fastest(first, time_again, rounds=9)
    assert best == "b"
    assert set(times) == {"a", "b"} and all(len(v) == 9 for v in times.values())


def test_a_candidate_that_fails_again_is_dropped():
    def time_again(c):
        if c == "a":
            raise RuntimeError("out of resources")
        return 2.0

    best, times = pick_fastest([("a", 1.0), ("b", 1.02)], time_again)
    assert best == "b" and set(times) == {"b"}


def test_if_every_finalist_fails_again_the_first_pass_stands():
    def time_again(c):
        raise RuntimeError("device lost")

    assert pick_fastest([("a", 1.0), ("b", 1.02)], time_again)[0] == "a"


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError, match="no candidate"):
        pick_fastest([], lambda c: 1.0)
    with pytest.raises(ValueError, match="rounds"):
        pick_fastest([("a", 1.0), ("b", 1.01)], lambda c: 1.0, rounds=0)


def test_the_tuners_timing_is_in_its_key_and_an_unknown_one_is_refused(monkeypatch):
    """Tables tuned with different timings are kept apart; a misspelt setting fails at the key, before any timing."""
    pytest.importorskip("triton")
    import torch

    from quantbridge.kernels import int4_settings as settings
    from quantbridge.kernels import int4_tuner as tn
    from quantbridge.kernels.tune_timing import check_timing, time_ms

    args = (4, 28672, 8192, 128, torch.bfloat16, "operand-tiled", 1)
    keys = {}
    for timing in ("do_bench", "read", "graph"):
        monkeypatch.setattr(settings, "TUNE_TIMING", timing)
        keys[timing] = tn.tuner_key(*args)
    assert keys["read"] == keys["do_bench"] + "-frd" and keys["graph"] == keys["do_bench"] + "-tgr"
    assert keys["do_bench"].startswith("m4-n28672-k8192-g128-bfloat16-")
    monkeypatch.setattr(settings, "TUNE_TIMING", "reed")
    with pytest.raises(ValueError, match="'reed'.*do_bench, read, graph"):
        tn.tuner_key(*args)
    with pytest.raises(ValueError, match="do_bench, read, graph"):
        check_timing("none")
    with pytest.raises(ValueError, match="do_bench, read, graph"):
        time_ms(lambda: None, torch.device("cpu"), "none", warmup=1, rep_ms=1)


@pytest.mark.gpu
@pytest.mark.parametrize("timing, eager_calls", [("read", None), ("graph", 4)])
def test_gpu_graph_timing_replays_the_launch_and_read_timing_calls_it(timing, eager_calls):
    """graph: fn runs in the two warm-up calls, once on the capture stream and once in the capture,
    never again (the timed runs are replays); read: once per timed run. Either way a positive median,
    on fresh random data, and the caller's stream is current again afterwards."""
    import torch

    from quantbridge.kernels.tune_timing import time_ms

    device = torch.device("cuda")
    a = torch.randn(1024, 1024, device=device)
    calls = []

    def fn():
        calls.append(1)
        return a @ a

    before = torch.cuda.current_stream(device)
    t = time_ms(fn, device, timing, warmup=2, rep_ms=1)
    assert t > 0 and torch.cuda.current_stream(device) == before
    if eager_calls is not None:
        assert len(calls) == eager_calls
    else:
        assert len(calls) >= 2 + 5 + 5  # warm-up, the estimate's five, at least five timed


def test_each_search_is_logged_where_asked_and_nowhere_otherwise(tmp_path, monkeypatch):
    """QUANTBRIDGE_TUNE_LOG: one JSON line per search (first pass fastest first, re-timings, pick)."""
    pytest.importorskip("triton")
    import json

    from quantbridge.kernels import int4_settings as settings
    from quantbridge.kernels import int4_tuner as tn

    rng = random.Random()
    searches = []
    for _ in range(rng.randint(2, 5)):
        timed = [((16, 128, 128, rng.choice([1, 4, -264, -396]), 4, rng.randint(3, 5)), rng.uniform(0.05, 0.07))
                 for _ in range(rng.randint(2, 8))]
        again = {timed[0][0]: [rng.uniform(0.05, 0.07) for _ in range(5)]}
        searches.append((f"m{rng.choice([1, 4, 16])}-n28672-k8192", timed, again, timed[0][0]))
    monkeypatch.delenv("QUANTBRIDGE_TUNE_LOG", raising=False)
    tn.log_search(*searches[0])  # not asked: nothing written anywhere
    log = tmp_path / "tune.jsonl"
    monkeypatch.setenv("QUANTBRIDGE_TUNE_LOG", str(log))
    for s in searches:
        tn.log_search(*s)
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert len(lines) == len(searches)
    for got, (key, timed, again, best) in zip(lines, searches):
        assert got["key"] == key and got["pick"] == list(best) and got["timing"] == settings.TUNE_TIMING
        assert [t for _, t in got["first_ms"]] == sorted(t for _, t in timed)
        assert got["again_ms"] == [[list(c), ts] for c, ts in again.items()]


def test_the_tuner_times_the_candidates_its_caller_launches_and_keeps_the_fastest(monkeypatch):
    """The tuner never launches on its own: every candidate of the M bucket goes to the run_candidate it
    was built with (the tuner's own x and out), a candidate that cannot run (None) or fails to compile
    (RuntimeError) is left out, and the fastest of the rest is the pick. Times here are drawn at random."""
    pytest.importorskip("triton")
    import torch

    from quantbridge.kernels import int4_configs as kc
    from quantbridge.kernels import int4_tuner as tn
    from quantbridge.plugin.packed import quantize_rtn
    from quantbridge.plugin.spec import QuantSpec

    rng = random.Random()
    w = quantize_rtn(torch.randn(256, 512), QuantSpec(group_size=128), scale_dtype=torch.float32)
    cands = kc.candidate_configs(4, 256, 512, 128)
    times = {c: rng.uniform(0.05, 0.07) for c in cands}
    cannot, fails = rng.sample(cands, 2)
    times[cannot] = times[fails] = 0.0  # faster than any: must still not be picked
    seen = []

    def run_candidate(cfg, xb, out, counters, w_, laid, layout, sz):
        assert xb.shape == (4, 512) and out.shape == (4, 256) and w_ is w and laid is None and sz is None
        seen.append(cfg)
        if cfg == fails:
            raise RuntimeError("out of shared memory")
        return None if cfg == cannot else (lambda: cfg)

    monkeypatch.setattr(tn, "time_ms", lambda run, device, timing, warmup, rep_ms: times[run()])
    best = tn.Tuner(run_candidate)._search(torch.randn(3, 512), w, 4)
    assert seen == cands
    assert best == min((c for c in cands if c not in (cannot, fails)), key=times.__getitem__)

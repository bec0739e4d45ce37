"""Bad values, refused in one line (exit 2) before the work they would spoil, in every command that takes them.

Each test covers a class: every option of that kind, in every command that has one.
"""

import json
import random

import numpy as np
import pytest

from cli_checks import FAST, invoke, one_line_error
from quantbridge.plugin.errors import UserError


@pytest.fixture()
def no_work(monkeypatch):
    """Nothing may be loaded, benchmarked or measured: these checks come first."""
    import quantbridge.cli.compare
    import quantbridge.models.load
    import quantbridge.run.bench
    import quantbridge.run.compare
    import quantbridge.run.convert

    def refuse(*a, **k):
        raise AssertionError("work started before the bad input was refused")

    for module, name in ((quantbridge.models.load, "load_model"), (quantbridge.run.convert, "load_model"),
                         (quantbridge.run.bench, "run_bench"), (quantbridge.cli.compare, "run_compare")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture()
def no_measuring(monkeypatch):
    """The model may load (the check needs its layers), but the reference run must not start."""
    import quantbridge.run.compare

    def refuse(*a, **k):
        raise AssertionError("the measuring started before the bad input was refused")

    monkeypatch.setattr(quantbridge.run.compare, "run_reference", refuse)


def _invalid_group_size(rng: random.Random) -> int:
    while True:
        g = rng.randint(-1000, 1000)
        if g not in (32, 64, 128, -1):
            return g


# -- group size: every command that takes one ---------------------------------------------------------


def test_parse_group_size_takes_only_supported_sizes():
    from quantbridge.plugin.spec import AUTO_GROUP, SUPPORTED_GROUP_SIZES, parse_group_size

    assert parse_group_size("auto") == parse_group_size(" AUTO ") == AUTO_GROUP
    for g in SUPPORTED_GROUP_SIZES:
        assert parse_group_size(str(g)) == g
    for g in [0, -0, 1, 2, 16, 48, 96, 256, 512, -2, -32, -128, *range(-300, 300)]:
        if g in SUPPORTED_GROUP_SIZES:
            continue
        with pytest.raises(UserError, match=rf"group size {g} is not supported .*use auto, 32, 64, 128 or -1"):
            parse_group_size(str(g))
    for text in ["", "x", "64.0", "1e2", "auto64"]:
        with pytest.raises(UserError, match="is not a group size; use auto, 32, 64, 128 or -1"):
            parse_group_size(text)


@pytest.mark.parametrize("command", [
    ["compare", "tiny", "--out", "{tmp}/out"],
    ["convert", "tiny", "--to", "native", "{tmp}/out"],
    ["bench", "--quick", "--out", "{tmp}/out"],
    ["bench", "--shapes", "4096x4096", "--out", "{tmp}/out"],
])
def test_group_size_refused_in_every_command(tmp_path, no_work, command):
    rng = random.Random()
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    for g in ["0", "-2", "96", str(_invalid_group_size(rng)), "x"]:
        needle = "is not a group size" if g == "x" else f"group size {int(g)} is not supported"
        one_line_error(invoke(*args, "--group-size", g), needle)
    assert not (tmp_path / "out").exists()


# -- integers that must be positive: batch lists, shapes, M -------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["compare", "tiny", "--batch", "0"], "0 is not a positive integer"),
    (["compare", "tiny", "--batch", "1,16,-4"], "-4 is not a positive integer"),
    (["bench", "--batch", "0"], "0 is not a positive integer"),
    (["bench", "--batch", "1,-1"], "-1 is not a positive integer"),
    (["bench", "--shapes", "0x0"], "shape 0x0 has a dimension below 1"),
    (["bench", "--shapes", "4096x0"], "shape 4096x0 has a dimension below 1"),
    (["bench", "--shapes", "quick,-64x64"], "shape -64x64 has a dimension below 1"),
    (["bench", "--shapes", ","], "names no shape"),
    (["plan", "tiny", "--batch", "0", "--max-weight-gb", "1"], "--batch"),
    (["plan", "tiny", "--batch", "-16", "--max-weight-gb", "1"], "--batch"),
    (["compare", "tiny", "--runs", "0"], "at least 5"),
    (["compare", "tiny", "--eval-seqs", "0"], "--eval-seqs"),
    (["compare", "tiny", "--calib-samples", "0"], "--calib-samples"),
    (["convert", "tiny", "--to", "native", "OUT", "--calib-samples", "0"], "--calib-samples"),
    (["convert", "tiny", "--to", "native", "OUT", "--calib-len", "-1"], "--calib-len"),
    (["bench", "--runs", "0"], "--runs"),
    (["bench", "--warmup", "-1"], "--warmup"),
])
def test_non_positive_integers_refused(tmp_path, no_work, args, needle):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    if args[0] in ("compare", "bench"):
        args += ["--out", str(tmp_path / "out")]
    one_line_error(invoke(*args), needle)
    assert not (tmp_path / "out").exists()


def test_plan_batch_zero_on_results_file(tmp_path, no_work):
    results = tmp_path / "results.json"
    results.write_text("{}")
    one_line_error(invoke("plan", results, "--batch", "0", "--max-weight-gb", "1", "--out", tmp_path / "p.json"),
                    "--batch")
    assert not (tmp_path / "p.json").exists()


def test_run_bench_refuses_non_positive_sizes():
    import torch

    from quantbridge.plugin.spec import QuantSpec
    from quantbridge.run.bench import run_bench

    for shapes, ms, needle in [([(64, 64)], [0], "M=0 is not a positive batch size"),
                               ([(64, 64)], [1, -3], "M=-3"), ([(0, 64)], [1], "shape 0x64"),
                               ([(64, -1)], [1], "shape 64x-1")]:
        with pytest.raises(UserError, match=needle):
            run_bench(shapes, ms, ["fp16"], torch.device("cpu"), torch.float32, QuantSpec(), runs=5, warmup=1)


# -- --plan that does not fit the model ---------------------------------------------------------------


def _plan_file(tmp_path, layers: dict, backends=None):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"schema": 1, "layers": layers,
                             "backends": sorted(set(layers.values()) - {"fp16"}) if backends is None else backends}))
    return p


def test_plan_naming_layers_the_model_lacks(tmp_path, tiny, no_measuring):
    layers = {"model.layers.0.mlp.down_proj": "native", "model.layers.9.mlp.down_proj": "native",
              "model.layers.0.self_attn.q_prj": "fp16"}
    plan = _plan_file(tmp_path, layers)
    r = invoke("compare", "tiny", "--plan", plan, *FAST, "--out", tmp_path / "out")
    one_line_error(r, "--plan names 2 layer(s) model tiny lacks: model.layers.9.mlp.down_proj, "
                       "model.layers.0.self_attn.q_prj (did you mean model.layers.0.self_attn.q_proj?); "
                       "was the plan made for another model?")
    assert not (tmp_path / "out").exists()


def test_plan_quantizing_a_skipped_layer(tmp_path, tiny, no_measuring):
    plan = _plan_file(tmp_path, {"model.layers.1.mlp.up_proj": "native", "lm_head": "native"})
    r = invoke("compare", "tiny", "--plan", plan, *FAST, "--out", tmp_path / "out")
    one_line_error(r, "--plan assigns native to lm_head, which this run keeps unquantized")


@pytest.mark.parametrize("layers,backends,needle", [
    ({"model.layers.0.mlp.up_proj": "no-such-backend"}, None, "unknown backend 'no-such-backend'"),
    ({"model.layers.0.mlp.up_proj": 4}, None, "is assigned 4, not a backend name"),
    ({"model.layers.0.mlp.up_proj": "native"}, "native", "'backends' is not a list of backend names"),
    ({"model.layers.0.mlp.up_proj": "native"}, ["native", 3], "'backends' is not a list of backend names"),
])
def test_plan_file_with_bad_assignments(tmp_path, no_work, layers, backends, needle):
    plan = _plan_file(tmp_path, layers, [] if backends is None else backends)
    one_line_error(invoke("compare", "tiny", "--plan", plan, "--out", tmp_path / "out"), needle)


def test_plan_backends_come_from_its_layers(tmp_path):
    from quantbridge.results.plan import load_plan

    plan = load_plan(str(_plan_file(tmp_path, {"a": "native", "b": "fp16"}, backends=[])))
    assert plan["backends"] == ["native"]  # a hand-edited plan runs every backend it assigns


# -- --skip that leaves nothing to quantize -----------------------------------------------------------


def test_skip_targets():
    from quantbridge.run.preflight import skip_targets

    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("mlp.up_proj", "self_attn.o_proj")] + ["lm_head"]
    assert skip_targets(names, r"(^|\.)lm_head$", "m") == names[:-1]
    assert skip_targets(names, "mlp", "m") == [n for n in names if "mlp" not in n]
    for pattern in [".*", "", "^", "proj|head", r"\.|head", "[a-z]"]:
        with pytest.raises(UserError, match=rf"matches every linear layer of m \({len(names)}\): nothing left to quantize"):
            skip_targets(names, pattern, "m")


@pytest.mark.parametrize("pattern", [".*", "proj|lm_head"])
def test_skip_everything_refused_before_work(tmp_path, tiny, no_measuring, pattern):
    one_line_error(invoke("compare", "tiny", "--skip", pattern, *FAST, "--out", tmp_path / "out"),
                    f"--skip {pattern!r} matches every linear layer of tiny (29): nothing left to quantize")
    assert not (tmp_path / "out").exists()
    one_line_error(invoke("convert", "tiny", "--to", "native", tmp_path / "ck", "--skip", pattern),
                    "nothing left to quantize")
    assert not (tmp_path / "ck").exists()


# -- GGUF files that are truncated or corrupt: every reader ------------------------------------------


def _small_gguf(path, rng: np.random.Generator):
    """A small well-formed GGUF: metadata with a string array, an F32 tensor and a Q4_0 tensor of random bytes."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(int(rng.integers(20, 80)))])
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float32) + 0.5)
    w.add_tensor("blk.0.ffn_down.weight", rng.integers(1, 256, size=(32, 36), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_truncation_and_corruption_of_a_gguf_is_named(tmp_path):
    pytest.importorskip("gguf")
    from quantbridge.formats.gguf import open_gguf

    rng = np.random.default_rng()
    whole = _small_gguf(tmp_path / "whole.gguf", rng).read_bytes()
    assert len(open_gguf(tmp_path / "whole.gguf").tensors) == 2
    bad = tmp_path / "bad.gguf"
    cuts = {0, 3, 4, 16, 24, len(whole) - 1, *rng.integers(1, len(whole), 150).tolist()}
    for cut in sorted(cuts):
        bad.write_bytes(whole[:cut])
        with pytest.raises(UserError, match=rf"^{bad} is truncated or corrupt .*re-download or re-convert it$"):
            open_gguf(bad)
    header = len(whole) - 16 * 64 * 4 - 32 * 36  # corrupt bytes where the counts, lengths and types live
    for _ in range(60):
        data = bytearray(whole)
        for i in rng.integers(4, header, int(rng.integers(1, 4))):
            data[i] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(data))
        try:
            open_gguf(bad)  # a corruption may still be a readable file; it must never be another exception
        except UserError as e:
            assert str(e).startswith(f"{bad} is truncated or corrupt") and "\n" not in str(e), e


def test_truncated_gguf_model_one_line(tmp_path, no_measuring):
    pytest.importorskip("gguf")
    sixteen = tmp_path / "sixteen.gguf"
    sixteen.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(8))  # the reported case: 16 bytes, a version, no counts
    whole = _small_gguf(tmp_path / "whole.gguf", np.random.default_rng()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 100])
    for f in (sixteen, cut):
        one_line_error(invoke("compare", f, "--backends", "fp16", *FAST, "--out", tmp_path / "out"),
                        f"{f} is truncated or corrupt")
        one_line_error(invoke("convert", f, "--to", "native", tmp_path / "ck"), f"{f} is truncated or corrupt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_gguf_rows_name_a_damaged_file(tmp_path):
    """The gguf quantizer and the llama.cpp row read the model's GGUF file again: a damaged one is named."""
    pytest.importorskip("gguf")
    import torch

    from quantbridge.models.gguf import read_int4
    from quantbridge.plugin.backend import EngineRun

    whole = _small_gguf(tmp_path / "whole.gguf", np.random.default_rng()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:40])
    with pytest.raises(UserError, match=f"{cut} is truncated or corrupt"):
        read_int4(cut, None)
    pytest.importorskip("llama_cpp")
    from quantbridge.adapters.llamacpp import LlamaCppBackend

    run = EngineRun(model_file=cut, eval_ids=torch.randint(1, 100, (1, 8)), reference_loss=2.0, batches=[1],
                    prefill=None, runs=3, warmup=1)
    with pytest.raises(UserError, match=f"{cut} is truncated or corrupt"):
        LlamaCppBackend().measure(run)


# -- config.json sizes that disagree with the weights -----------------------------------------------


@pytest.fixture()
def tiny_copy(tmp_path, tiny):
    import shutil

    from quantbridge.models.load import tiny_path

    d = tmp_path / "model"
    shutil.copytree(tiny_path(), d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_config_sizes_disagree_with_weights(tmp_path, tiny_copy, no_measuring):
    rng = random.Random()
    _edit_config(tiny_copy, intermediate_size=rng.choice([512, 640, 1024, 1536]))
    needle = (f"{tiny_copy / 'config.json'} disagrees with the weights in 12 tensor(s): "
              f"model.layers.0.mlp.down_proj.weight is 256x768 in model.safetensors")
    one_line_error(invoke("compare", tiny_copy, "--backends", "fp16", *FAST, "--out", tmp_path / "out"), needle)
    one_line_error(invoke("convert", tiny_copy, "--to", "native", tmp_path / "ck"), needle)
    _edit_config(tiny_copy, intermediate_size=768, vocab_size=rng.randint(4097, 6000))
    one_line_error(invoke("compare", tiny_copy, "--backends", "fp16", *FAST, "--out", tmp_path / "out"),
                    "in 2 tensor(s): lm_head.weight is 4096x256 in model.safetensors")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_quantized_checkpoint_config_disagrees(tmp_path, tiny, no_measuring):
    ck = tmp_path / "ck"
    assert invoke("convert", "tiny", "--to", "gptq", ck).exit_code == 0
    _edit_config(ck, hidden_size=512)
    r = invoke("compare", ck, "--backends", "fp16", *FAST, "--out", tmp_path / "out")
    one_line_error(r, f"{ck / 'config.json'} disagrees with the weights in")
    one_line_error(invoke("convert", ck, "--to", "awq", tmp_path / "awq"), "disagrees with the weights in")
    assert not (tmp_path / "awq").exists()


# -- serve-stats: a worker file with a field of the wrong type is skipped and named ----------------------


def _worker(rank: int, rng: random.Random) -> dict:
    samples = [rng.uniform(1, 50) for _ in range(rng.randint(2, 6))]
    return {"schema": 1, "pid": rng.randint(100, 9999), "host": "h", "backend": "native", "model": "m",
            "device": "cpu", "tp_rank": rank, "tp_size": 1, "updated": 1.5e9, "flushes": 3,
            "warmup_calls": {"model.layers.0.mlp.down_proj": 2},
            "layers": {"model.layers.0.mlp.down_proj": {"shape": [8, 16], "kernel": "reference-torch",
                                                        "weight_bytes": 80,
                                                        "m": {"1": {"count": len(samples), "total_us": sum(samples),
                                                                    "min_us": min(samples), "max_us": max(samples),
                                                                    "samples_us": samples}}}}}


L0 = ("layers", "model.layers.0.mlp.down_proj")
M1 = (*L0, "m", "1")
WRONG_TYPES = [
    ((), "tp_rank", "0"), ((), "tp_rank", -1), ((), "tp_size", 1.5), ((), "backend", 7), ((), "model", ["m"]),
    ((), "device", None), ((), "flushes", "many"), ((), "pid", True), ((), "updated", "now"), ((), "schema", "1"),
    ((), "warmup_calls", [1]), ((), "warmup_calls", {"x": "two"}),
    (L0, "weight_bytes", "big"), (L0, "weight_bytes", 80.5), (L0, "kernel", 3), (L0, "shape", "8x16"),
    (L0, "shape", [8, "16"]),
    (M1, "count", "3"), (M1, "count", 2.0), (M1, "total_us", "6"), (M1, "min_us", "fast"), (M1, "max_us", [1]),
    (M1, "samples_us", [1.0, "2"]), (M1, "samples_us", "1,2"), (M1, "samples_ns", [1000, 2.5]),
]


@pytest.mark.parametrize("where,key,value", WRONG_TYPES)
def test_serve_stats_skips_a_wrong_typed_field(tmp_path, where, key, value):
    rng = random.Random()
    d = tmp_path / "prof"
    d.mkdir()
    (d / "worker-0.json").write_text(json.dumps(_worker(0, rng)))
    bad = _worker(0, rng)
    target = bad
    for k in where:
        target = target[k]
    target[key] = value
    (d / "worker-1.json").write_text(json.dumps(bad))
    r = invoke("serve-stats", d, "--out", tmp_path / "merged.json")
    assert r.exit_code == 0, r.output
    assert f"warning: skipped {d / 'worker-1.json'}:" in r.output and key in r.output, r.output
    assert "1 worker file(s)" in r.output and "Traceback" not in r.output
    (d / "worker-0.json").write_text(json.dumps(bad))
    one_line_error(invoke("serve-stats", d, "--out", tmp_path / "merged2.json"), "no usable worker file in")
    assert not (tmp_path / "merged2.json").exists()


def test_serve_stats_with_no_timed_call(tmp_path):
    d = tmp_path / "prof"
    d.mkdir()
    w = _worker(0, random.Random())
    w["layers"]["model.layers.0.mlp.down_proj"]["m"] = {}  # a server that loaded but served nothing yet
    (d / "worker-0.json").write_text(json.dumps(w))
    one_line_error(invoke("serve-stats", d, "--out", tmp_path / "m.json"), "hold no timed layer call yet")
    assert not (tmp_path / "m.json").exists()


# -- report: a results file with nothing to report ----------------------------------------------------


@pytest.mark.parametrize("backends,needle", [
    ([], "has nothing to report: it holds no backend rows"),
    ([{"name": "fp16", "status": "ok"}, {"name": "native", "status": "ok"}],
     "has nothing to report: none of its 2 row(s) holds a figure or a reason"),
])
def test_report_with_nothing_to_report(tmp_path, backends, needle):
    from quantbridge.results.schema import BackendResult, Comparison, save_json

    f = tmp_path / "results.json"
    save_json(Comparison(model={"name": "m"}, device={"name": "cpu"}, settings={},
                         backends=[BackendResult(**b) for b in backends]), f)
    for extra in ([], ["--html", tmp_path / "r" / "r.html"], ["--md", tmp_path / "r.md"]):
        one_line_error(invoke("report", f, *extra), f"{f} {needle}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# -- --eval-text and --calib: only the prefix the tokens need is read -----------------------------------


@pytest.fixture()
def big_text(tmp_path):
    """About 12 MB: real prose for its first 4 MB, then bytes that are not UTF-8 (never read)."""
    from quantbridge.models.text import shipped_text

    f = tmp_path / "big.txt"
    prose = shipped_text().encode()
    with open(f, "wb") as out:
        while out.tell() < 4_000_000:
            out.write(prose)
        out.write(np.random.default_rng().integers(128, 256, 8_000_000, dtype=np.uint8).tobytes())
    return f


@pytest.fixture()
def tokenized(monkeypatch):
    """The length of every text the tokenizer is given."""
    import quantbridge.models.text as workloads

    seen: list[int] = []
    real = workloads.tokenize

    def spy(tokenizer, text):
        seen.append(len(text))
        return real(tokenizer, text)

    monkeypatch.setattr(workloads, "tokenize", spy)
    return seen


def test_file_tokens_reads_a_bounded_prefix(tiny, big_text, tokenized):
    from quantbridge.models.text import file_tokens

    for want in (512, 5_000, 100_000):
        tokenized.clear()
        tokens = file_tokens(tiny.tokenizer, str(big_text), "--eval-text", want)
        assert want <= tokens.numel() <= 64 * want + 100_000
        assert max(tokenized) <= 64 * want + (1 << 16)  # the prefix grows with what is wanted, not the file


def test_prefix_ends_between_characters_and_words(tmp_path):
    from quantbridge.models.textfile import read_text_prefix

    f = tmp_path / "accents.txt"
    # "abc" puts the first byte of a two-byte "é" last in a 65536-byte prefix
    f.write_text("abc" + "é " * 100_000, encoding="utf-8")
    text, whole = read_text_prefix(f, "--eval-text", 1 << 16)
    assert not whole and text.startswith("abcé é") and text.endswith("é") and len(text.encode()) <= 1 << 16
    assert read_text_prefix(f, "--eval-text", None) == (f.read_text(encoding="utf-8"), True)


def test_strictness_of_the_prefix(tmp_path):
    from quantbridge.models.textfile import read_text_prefix

    f = tmp_path / "t.txt"
    f.write_bytes(b"text \xff more" + b" words" * 100_000)
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0xff at offset 5, 1 undecodable"):
        read_text_prefix(f, "--eval-text", 1 << 16)
    f.write_bytes(b"text\x00" + b" words" * 100_000)
    with pytest.raises(UserError, match="holds NUL bytes"):
        read_text_prefix(f, "--calib", 1 << 16)
    f.write_bytes(b" \n " * 10)
    with pytest.raises(UserError, match="is empty"):
        read_text_prefix(f, "--calib", 1 << 16)


def test_compare_reads_only_what_the_eval_tokens_need(tmp_path, tiny, big_text, tokenized):
    from quantbridge.models.textfile import TEXT_CHECK_BYTES

    r = invoke("compare", "tiny", "--backends", "fp16", *FAST, "--isolation", "none", "--eval-text", big_text,
                "--no-report", "-q", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["eval_tokens"] == 16
    assert max(tokenized) < TEXT_CHECK_BYTES  # never the 12 MB file, whose tail is not even text


def test_calibration_reads_what_calibration_needs(tmp_path, tiny, big_text, tokenized):
    from quantbridge.models.text import calibration, calibration_tokens

    cal = calibration(tiny.tokenizer, 8, 64, str(big_text))
    assert cal.input_ids.shape == (8, 64) and max(tokenized) < (1 << 20)
    # between --calib-len and --calib-samples x --calib-len tokens: refused in one line, not by windows()
    short = tmp_path / "short.txt"
    short.write_text(" ".join(["word"] * 300))
    n = int(calibration_tokens(tiny.tokenizer, 1, 2, str(short)).numel())
    length = n // 2
    with pytest.raises(UserError, match=rf"has {n} tokens, fewer than --calib-len {length} x --calib-samples 4 = "
                                        rf"{4 * length}, what calibration needs"):
        calibration(tiny.tokenizer, 4, length, str(short))


@pytest.mark.parametrize("command", [["compare", "tiny", "--out", "{tmp}/out"],
                                     ["convert", "tiny", "--to", "gptq", "{tmp}/out", "--method", "gptq"]])
def test_calibration_text_refused_before_loading(tmp_path, no_work, command):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"calibration text " * 10 + b"\xc3\x28" + b" more" * 300_000)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    one_line_error(invoke(*args, "--calib", bad), "is not UTF-8 text (byte 0xc3 at offset 170")
    assert not (tmp_path / "out").exists()

"""`quantbridge bench --quick` on the CPU: every row checked, timed, written, plotted."""

import json

import pytest
from click.testing import CliRunner

from quantbridge.cli import cli


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    pytest.importorskip("llmcompressor")
    r = CliRunner().invoke(cli, ["bench", "--quick", "--backends", "fp16,native,tinygemm,gptq",
                                 "--kernels", "gptq-layout,exllamav2", "--out", str(out)])
    res = json.loads((out / "bench.json").read_text())
    # Named backends and kernels that cannot run here make the exit status 1, each named with its fix.
    missing = sorted({row["backend"] for row in res["rows"] if row["status"] != "ok"})
    assert r.exit_code == (1 if missing else 0), r.output
    for name in missing:
        assert f"Error: row {name} unavailable" in r.output and "fix: " in r.output
    return out, res


def test_rows_checked_and_timed(quick):
    _, res = quick
    rows = res["rows"]
    assert {r["backend"] for r in rows} == {"fp16", "native", "tinygemm", "gptq", "rtn+gptq-layout", "rtn+exllamav2"}
    for r in rows:
        if r["backend"] in ("tinygemm", "rtn+exllamav2"):  # CUDA only: said so, not faked
            assert r["status"] == "unavailable" and ("CUDA" in r["reason"] or "not installed" in r["reason"])
            continue
        assert r["status"] == "ok", r
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["check_rel_err"] < 1e-5  # fp32 on CPU against the float64 product
        assert r["bytes"] > 0 and 0 < r["pct_copy_bw"]
        assert r["timing"] == "eager" and r["graph_launch_us"] is None  # no graph on the CPU: nothing apart
    kernels = {r["backend"]: r["kernel"] for r in rows if r["status"] == "ok"}
    assert kernels["native"] == "reference-torch" and kernels["gptq"] == "reference-torch"
    assert kernels["rtn+gptq-layout"] == "reference-torch"  # a kernel on its own, RTN codes
    assert {r["m"] for r in rows} == {1, 16}
    assert res["copy_bandwidth"]["bytes_per_s"] > 0
    assert res["complete"] is True and res["settings"]["l2_flush"] is None  # nothing to flush on the CPU


def test_markdown_and_plot(quick):
    out, _ = quick
    md = (out / "bench.md").read_text()
    assert "| M |" in md and "native" in md
    assert "stopped" not in md and "L2 not flushed" in md
    from quantbridge.report.bench import to_markdown

    cut = json.loads((out / "bench.json").read_text()) | {"complete": False}
    assert f"Part of a run that was stopped**: {len(cut['rows'])} rows" in to_markdown(cut)
    png = out / "roofline.png"
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.size[0] > 300 and im.size[1] > 200
        assert len(set(im.convert("L").getdata())) > 8  # more than a blank canvas


def test_a_kernel_limit_is_unavailable_not_failed(monkeypatch):
    """No kernel of a backend takes this weight here (tinygemm in fp16, say): a limit, said as such."""
    import torch

    from quantbridge.measure.probes import L2Flush
    from quantbridge.plugin.errors import NoKernel
    from quantbridge.plugin.spec import QuantSpec
    from quantbridge.run import bench
    from quantbridge.run.rowspec import Kind, RowSpec

    def refuse(*_):
        raise NoKernel("no kernel of tinygemm can run this weight: tinygemm: bf16 activations only, not float16")

    monkeypatch.setattr(bench, "_layer", refuse)
    cpu = torch.device("cpu")
    rows = bench.bench_layer(RowSpec("tinygemm", Kind.BACKEND), 64, 32, [1, 4], QuantSpec(group_size=32), cpu,
                             torch.float16, 3, 1, L2Flush(cpu), 1e9)
    assert [(r.m, r.status) for r in rows] == [(1, "unavailable"), (4, "unavailable")]
    assert "bf16 activations only" in rows[0].reason

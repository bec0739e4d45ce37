"""benchmarks/ncu_kernel_summary.py and ncu_sass_stalls.py on CSV laid out as ncu writes it, with
ncu's and the profiled program's own lines around the table (random values, fresh per run)."""

import csv
import io
import random
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ncu_kernel_summary as nks  # noqa: E402
import ncu_sass_stalls as nss  # noqa: E402

_METRICS_HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
                   "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]


def _us(line: str) -> float:
    """The first figure in µs on a summary line."""
    return float(line.split(" us")[0].split()[-1])


def _metrics_csv(path: Path, launches: list[tuple[str, str, float, float]]) -> None:
    """launches: (kernel, grid, duration in ns, MB read), one metric row each as ncu --csv writes them."""
    buf = io.StringIO()
    buf.write("==PROF== Connected to process 7\nbench: timing rows\n")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(_METRICS_HEADER)
    for i, (kernel, grid, ns, mb) in enumerate(launches):
        for name, unit, value in (("gpu__time_duration.sum", "ns", f"{ns:,.0f}"),
                                  ("dram__bytes_read.sum", "Mbyte", f"{mb:.2f}"),
                                  ("sm__cycles_elapsed.avg.per_second", "Ghz", "1.80")):
            w.writerow([str(i), "7", "python3", "h", kernel, "1", "7", "(256, 1, 1)", grid, "0", "9.0",
                        "Command line profiler metrics", name, unit, value])
    buf.write("==PROF== Disconnected from process 7\n")
    path.write_text(buf.getvalue())


def test_kernel_summary_groups_consecutive_launches_and_converts_units(tmp_path):
    rng = random.Random()
    # whole ns, as ncu writes them
    a = [rng.randint(50_000, 60_000) for _ in range(rng.randint(5, 30))]
    b = [rng.randint(40_000, 45_000) for _ in range(rng.randint(5, 30))]
    c = [rng.randint(50_000, 60_000) for _ in range(rng.randint(5, 30))]
    launches = [("_int4_matmul_kernel", "(64, 4, 1)", t, 126.0) for t in a] \
        + [("void marlin::Marlin<1, 2>(const int4 *)", "(132, 1, 1)", t, 122.0) for t in b] \
        + [("_int4_matmul_kernel", "(64, 4, 1)", t, 127.0) for t in c]  # the same kernel again: a third row
    f = tmp_path / "bench-ncu.csv"
    _metrics_csv(f, launches)
    lines = nks.summary(f)
    assert len(lines) == 3
    for line, times, name in zip(lines, (a, b, c), ("_int4_matmul_kernel", "void marlin::Marlin<1, 2>", "_int4")):
        assert line.startswith(name) and f"n={len(times):3d}" in line
        assert _us(line) == pytest.approx(statistics.median(times) / 1e3, abs=0.0051)  # ns in the file, µs here
    assert "DRAM read   122.0 MB" in lines[1] and "SM 1.80 GHz" in lines[1]


def test_kernel_summary_refuses_a_unit_it_does_not_know_and_a_file_without_a_table(tmp_path):
    f = tmp_path / "odd.csv"
    _metrics_csv(f, [("k", "(1, 1, 1)", 1000.0, 1.0)])
    f.write_text(f.read_text().replace('"ns"', '"fortnight"'))
    with pytest.raises(SystemExit, match="fortnight"):
        nks.summary(f)
    g = tmp_path / "empty.csv"
    g.write_text("==PROF== No kernels were profiled.\n")
    with pytest.raises(SystemExit, match="no ncu CSV header"):
        nks.summary(g)


def test_sass_stalls_ranks_instructions_and_opcodes_by_samples(tmp_path):
    rng = random.Random()
    sass = ["@P0 BAR.SYNC.DEFER_BLOCKING 0x0", "LDG.E.128 R4, desc[UR6][R2.64]", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8]",
            "@!P1 LDG.E.128 R8, desc[UR6][R6.64]", "IMAD R3, R2, 0x4, RZ"]
    counts = [rng.randint(1, 10_000) for _ in sass]
    buf = io.StringIO()
    buf.write("==PROF== Connected\n")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)"])
    for i, (s, c) in enumerate(zip(sass, counts)):
        w.writerow([f"0x{16 * i:x}", s, f"{c:,}", str(c // 2)])
    buf.write("==PROF== Disconnected\n")
    f = tmp_path / "sass.csv"
    f.write_text(buf.getvalue())
    lines = nss.summary(f, top=2)
    total = sum(counts)
    assert lines[0] == f"{total} samples over 5 instructions; the 2 with the most:"
    first = max(range(5), key=lambda i: counts[i])
    assert lines[1].endswith(sass[first]) and f"{100 * counts[first] / total:5.1f} %" in lines[1]
    by_op = dict(line.split(" %  ")[::-1] for line in lines[lines.index("by opcode:") + 1:])
    assert float(by_op["LDG.E.128"]) == pytest.approx(100 * (counts[1] + counts[3]) / total, abs=0.051)
    assert nss.opcode("@!UP2 BAR.SYNC 0x1") == "BAR.SYNC"


def test_sass_stalls_lay_each_reason_at_its_instructions(tmp_path):
    rng = random.Random()
    sass = ["USETMAXREG.DEALLOC.CTAPOOL 0x18", "SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR7+0x38020], RZ",
            "LDG.E R190, desc[UR22][R190.64]", "HGMMA.64x256x16.F32.BF16 R24, R168, gdesc[UR4], R24"]
    reasons = ["stall_barrier", "stall_long_sb", "stall_wait"]
    cells = [[rng.randint(1, 5_000) for _ in reasons] for _ in sass]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    w.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)"]
               + reasons + [f"{r} (Not Issued)" for r in reasons])
    for i, (s, c) in enumerate(zip(sass, cells)):
        w.writerow([f"0x7f00{16 * i:04x}", s, f"{sum(c):,}", "1"] + [f"{v:,}" for v in c] + ["0"] * len(reasons))
    f = tmp_path / "sass.csv"
    f.write_text(buf.getvalue())
    total = sum(map(sum, cells))
    lines = nss.by_reason(f, ["barrier", "long_sb"], top=2)
    share = {r: 100 * sum(c[j] for c in cells) / total for j, r in enumerate(reasons)}
    assert lines[0].startswith("by reason: ") and "Not Issued" not in lines[0]
    for r, v in share.items():
        assert f"{r.removeprefix('stall_')} {v:.1f} %" in lines[0]
    i = lines.index(f"barrier: {share['stall_barrier']:.1f} % of all samples, at:")
    first = max(range(len(sass)), key=lambda k: cells[k][0])
    assert lines[i + 1].endswith(sass[first]) and f"{100 * cells[first][0] / total:5.1f} %" in lines[i + 1]
    with pytest.raises(SystemExit, match="no column 'stall_gmma'"):
        nss.by_reason(f, ["gmma"])


def test_sass_stalls_names_what_is_missing(tmp_path):
    f = tmp_path / "no-samples.csv"
    f.write_text('"Address","Source","Instructions Executed"\n"0x0","NOP","3"\n')
    with pytest.raises(SystemExit, match="Warp Stall Sampling"):
        nss.summary(f)


def test_kernel_listing_keeps_every_launch_in_order(tmp_path):
    rng = random.Random()
    launches = [(rng.choice(["_int4_matmul_kernel", "graph"]), "(1, 1, 1)", rng.randint(1_000, 90_000), 1.0)
                for _ in range(rng.randint(3, 20))]
    f = tmp_path / "each.csv"
    _metrics_csv(f, launches)
    lines = nks.listing(f)
    assert len(lines) == len(launches)
    for i, (line, (name, _, ns, _)) in enumerate(zip(lines, launches)):
        assert line.split()[:2] == [str(i), name] and _us(line) == pytest.approx(ns / 1e3, abs=0.0051)

"""benchmarks/bench_cells.py: the cell counts cited in benchmarks/NOTES.md."""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cells  # noqa: E402


def _row(backend, k, n, m, us, status="ok", kernel="k"):
    return {"backend": backend, "kernel": kernel, "k": k, "n": n, "m": m, "median_us": us, "status": status}


def test_cells_count_leads_and_bf16_against_random_medians(tmp_path, capsys):
    rng = random.Random()
    rows, want_leads, want_below, n_cells = [], 0, 0, 0
    for m in (1, 4, 16, 64):
        native, bf16 = rng.uniform(5, 50), rng.uniform(5, 50)
        others = [rng.uniform(5, 50) for _ in range(3)]
        rows += [_row("native", 4096, 1024, m, native), _row("fp16", 4096, 1024, m, bf16)]
        rows += [_row(f"rtn+k{i}", 4096, 1024, m, us) for i, us in enumerate(others)]
        # a row that did not run never decides a cell, however fast its stale number
        rows.append(_row("tinygemm", 4096, 1024, m, 0.5, status="error"))
        want_leads += native <= min(others)
        want_below += native < bf16
        n_cells += 1
    rows.append(_row("fp16", 4096, 4096, 1, 9.0))  # no native row: not a cell
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    assert bench_cells.main([str(path), "--misses"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"native at or below the fastest other INT4 kernel in {want_leads} of {n_cells} cells; "
                     f"below bf16 in {want_below} of {n_cells}")


def test_a_tie_with_the_fastest_other_kernel_counts_as_leading():
    table = bench_cells.cells([_row("native", 8, 8, 1, 3.25), _row("rtn+marlin", 8, 8, 1, 3.25),
                               _row("fp16", 8, 8, 1, 3.25)])
    (v,) = bench_cells.verdicts(table)
    assert v["leads"] and not v["beats_bf16"] and v["best_other"] == "rtn+marlin"

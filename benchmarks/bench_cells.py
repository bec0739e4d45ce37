"""Count the cells of `quantbridge bench` results where native leads.

A cell is one (K, N, M). Native "leads" where its median is at or below the lowest median of
every other INT4 row of the cell, and "beats bf16" where it is below the `fp16` row (the
unquantized reference, bf16 in these runs). Rows that did not run (`status` other than "ok")
are left out of the comparison, and a cell without a native row is not counted.

    python benchmarks/bench_cells.py benchmarks/results/kernels-vllm-*-r10-llama3-{8b,70b}.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

REFERENCE = "fp16"
NATIVE = "native"


def cells(rows: list[dict]) -> dict[tuple[int, int, int], dict[str, float]]:
    """(k, n, m) -> {row label: median µs}, ok rows only."""
    out: dict[tuple[int, int, int], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("status") != "ok" or row.get("median_us") is None:
            continue
        out[(row["k"], row["n"], row["m"])][row["backend"]] = float(row["median_us"])
    return dict(out)


def verdicts(table: dict[tuple[int, int, int], dict[str, float]]) -> list[dict]:
    """One verdict per cell with a native row: the fastest other INT4 row and bf16 beside native."""
    out = []
    for (k, n, m), medians in sorted(table.items()):
        if NATIVE not in medians:
            continue
        others = {name: us for name, us in medians.items() if name not in (NATIVE, REFERENCE)}
        best = min(others, key=others.get) if others else None
        out.append({
            "k": k, "n": n, "m": m, "native_us": medians[NATIVE],
            "best_other": best, "best_other_us": others.get(best) if best else None,
            "bf16_us": medians.get(REFERENCE),
            "leads": best is None or medians[NATIVE] <= others[best],
            "beats_bf16": REFERENCE in medians and medians[NATIVE] < medians[REFERENCE],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="bench.json files (their rows are pooled)")
    ap.add_argument("--misses", action="store_true", help="list every cell native does not lead")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    for path in args.results:
        rows += json.loads(path.read_text())["rows"]
    vs = verdicts(cells(rows))
    leads = sum(v["leads"] for v in vs)
    below = sum(v["beats_bf16"] for v in vs)
    print(f"native at or below the fastest other INT4 kernel in {leads} of {len(vs)} cells; "
          f"below bf16 in {below} of {len(vs)}")
    if args.misses:
        for v in vs:
            if v["leads"] and v["beats_bf16"]:
                continue
            bf16 = f"{v['bf16_us']:.1f}" if v["bf16_us"] is not None else "-"
            other = f"{v['best_other']} {v['best_other_us']:.1f}" if v["best_other"] else "-"
            print(f"{v['k']}x{v['n']} M={v['m']}: native {v['native_us']:.1f}, {other}, bf16 {bf16}"
                  f"{'' if v['leads'] else '  [behind]'}{'' if v['beats_bf16'] else '  [>= bf16]'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

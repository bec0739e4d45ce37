"""Summarise an `ncu --csv` metrics run: one line per run of consecutive launches of one kernel.

    python benchmarks/ncu_kernel_summary.py bench-ncu.csv
    python benchmarks/ncu_kernel_summary.py --each bench-ncu.csv     # every launch, in order

ncu prints one CSV row per (launch, metric). Launches of the same kernel with the same grid that
follow one another are one bench row's calls (its check, warm-up and replays), so they are summarised
together: how many, the median duration with p10 and p90, the median DRAM bytes read and the SM clock.
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

DURATION, DRAM_READ, SM_CLOCK = "gpu__time_duration.sum", "dram__bytes_read.sum", "sm__cycles_elapsed.avg.per_second"
# ncu reports each metric in the unit it picks per launch; these convert to µs, MB and GHz.
_SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0,
          "Gbyte": 1e3, "B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3, "hz": 1e-9, "Khz": 1e-6, "Mhz": 1e-3, "Ghz": 1.0, "cycle/ns": 1.0, "cycle/us": 1e-3, "cycle/nsecond": 1.0,
          "cycle/usecond": 1e-3, "cycle/second": 1e-9}


def launches(path: Path) -> list[dict]:
    """[{id, kernel, grid, block, metric: value}] in launch order."""
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV header (\"ID\",...) found: did ncu profile any kernel?")
    by_id: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        if not row.get("ID", "").isdigit():
            continue
        entry = by_id.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"],
                                             "grid": row["Grid Size"], "block": row["Block Size"]})
        value = row["Metric Value"].replace(",", "")
        try:
            entry[row["Metric Name"]] = float(value) * _SCALE[row["Metric Unit"]]
        except KeyError:
            raise SystemExit(f"{path}: unit {row['Metric Unit']!r} of {row['Metric Name']} not known here") from None
        except ValueError:
            continue
    return sorted(by_id.values(), key=lambda e: e["id"])


def runs(items: list[dict]) -> list[list[dict]]:
    """Consecutive launches of one (kernel, grid, block) grouped."""
    out: list[list[dict]] = []
    for e in items:
        if out and (out[-1][0]["kernel"], out[-1][0]["grid"], out[-1][0]["block"]) == (e["kernel"], e["grid"], e["block"]):
            out[-1].append(e)
        else:
            out.append([e])
    return out


def _median(group: list[dict], key: str) -> float:
    values = [e[key] for e in group if key in e]
    return statistics.median(values) if values else float("nan")


def summary(path: Path) -> list[str]:
    rows = []
    for group in runs(launches(path)):
        times = sorted(e[DURATION] for e in group if DURATION in e)
        if not times:
            continue
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
        name = group[0]["kernel"].split("(")[0][:48]
        rows.append(f"{name:48s} grid {group[0]['grid']:>14s} n={len(times):3d}  {statistics.median(times):8.2f} us "
                    f"p10 {q[0]:7.2f} p90 {q[-1]:7.2f}  DRAM read {_median(group, DRAM_READ):7.1f} MB  "
                    f"SM {_median(group, SM_CLOCK):.2f} GHz")
    return rows


def listing(path: Path) -> list[str]:
    """Every launch in order, one line each (graphs profiled whole interleave with the eager work)."""
    return [f"{e['id']:6d} {e['kernel'].split('(')[0][:60]:60s} grid {e['grid']:>14s} "
            f"{e.get(DURATION, float('nan')):9.2f} us  DRAM read {e.get(DRAM_READ, float('nan')):8.1f} MB"
            for e in launches(path)]


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[0] != "--each"):
        print("usage: ncu_kernel_summary.py [--each] NCU_CSV   (--each: every launch, not runs of them)",
              file=sys.stderr)
        return 2
    for line in (listing if argv[0] == "--each" else summary)(Path(argv[-1])):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a kernel's warps wait, instruction by instruction: ncu's SASS source page, summarised.

    ncu --section WarpStateStats --section SourceCounters -o rep python3 ...     # on the GPU
    ncu --import rep.ncu-rep --page source --print-source sass --csv > rep.csv
    python benchmarks/ncu_sass_stalls.py rep.csv [--top 25]

ncu samples each warp's program counter and why it is not issuing; the source page gives those
samples per SASS instruction. WarpStateStats says how much a kernel stalls on, e.g., a barrier or a
global load (long scoreboard); this says at which instruction, so a stall can be laid at the code
that causes it (the stage release's barrier, a scale load, the stream-K fix-up's loads) before any
change is made for it. Prints the instructions with the most samples, then the samples by opcode,
then each stall reason's share of all samples and, for the reasons asked for (`--reason`), the
instructions that reason's samples sit at: a kernel-wide "barrier" figure, for one, counts idle warps
parked at a barrier (a warp-specialized kernel's unused producer warps) as much as a consumer's fence.

    python benchmarks/ncu_sass_stalls.py rep.csv --reason barrier,long_sb
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


def rows(path: Path) -> tuple[list[dict], str]:
    """The source page's rows (one per SASS instruction) and the name of its samples column."""
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if '"Source"' in line and "Warp Stall Sampling" in line:
            reader = csv.DictReader(lines[i:])
            samples = next((c for c in reader.fieldnames or () if c.startswith(SAMPLES)), None)
            if samples is None:
                break
            # rows cut short (ncu's own messages after the table) are not instructions
            return [r for r in reader if r.get("Source") is not None and r.get(samples) is not None], samples
    raise SystemExit(f"{path}: no source-page table with a {SAMPLES!r} column (ncu --page source --csv "
                     f"--print-source sass of a report with SourceCounters)")


def _count(value: str) -> int:
    try:
        return int(float(value.replace(",", "") or 0))
    except ValueError:
        return 0


def opcode(sass: str) -> str:
    """The opcode of one SASS line, predicate dropped: "@P0 LDG.E.128 R4, [R2.64]" -> "LDG.E.128"."""
    text = _PREDICATE.sub("", sass.strip())
    return text.split(" ", 1)[0].rstrip(";") if text else ""


def summary(path: Path, top: int = 25) -> list[str]:
    table, col = rows(path)
    counted = [(_count(r[col]), r.get("Address", r.get("# Address", "")), r["Source"].strip()) for r in table]
    total = sum(c for c, _, _ in counted)
    if not total:
        return [f"{path}: no stall samples"]
    out = [f"{total} samples over {len(counted)} instructions; the {top} with the most:"]
    for c, addr, sass in sorted(counted, key=lambda t: -t[0])[:top]:
        out.append(f"  {100 * c / total:5.1f} %  {addr:>8s}  {sass}")
    by_op = Counter()
    for c, _, sass in counted:
        by_op[opcode(sass)] += c
    out.append("by opcode:")
    out += [f"  {100 * c / total:5.1f} %  {op}" for op, c in by_op.most_common(12) if c]
    return out


def _reason_columns(table: list[dict]) -> list[str]:
    """ncu's per-instruction stall columns (all samples, not the not-issued ones): stall_barrier, ..."""
    return [c for c in (table[0] if table else {}) if c.startswith("stall_") and not c.endswith("(Not Issued)")]


def by_reason(path: Path, reasons: list[str], top: int = 8) -> list[str]:
    """Each stall reason's share of all samples (those of 0.5 % and more), then for each reason in
    `reasons` (without the stall_ prefix) the instructions holding most of its samples."""
    table, col = rows(path)
    total = sum(_count(r[col]) for r in table)
    cols = _reason_columns(table)
    if not total or not cols:
        return [f"{path}: no stall samples by reason (ncu's source page without its stall_* columns)"]
    share = {c: sum(_count(r[c]) for r in table) / total for c in cols}
    out = ["by reason: " + ", ".join(f"{c.removeprefix('stall_')} {100 * v:.1f} %"
                                     for c, v in sorted(share.items(), key=lambda cv: -cv[1]) if v >= 0.005)]
    for reason in reasons:
        c = f"stall_{reason.removeprefix('stall_')}"
        if c not in share:
            raise SystemExit(f"{path}: no column {c!r}; the reasons are {', '.join(x.removeprefix('stall_') for x in cols)}")
        out.append(f"{reason}: {100 * share[c]:.1f} % of all samples, at:")
        ranked = sorted(table, key=lambda r: -_count(r[c]))[:top]
        out += [f"  {100 * _count(r[c]) / total:5.1f} %  {r.get('Address', '')[-6:]:>6s}  {r['Source'].strip()}"
                for r in ranked if _count(r[c])]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--reason", default="", help="stall reasons to lay at their instructions, e.g. barrier,long_sb")
    a = ap.parse_args(argv)
    for line in summary(a.csv, a.top):
        print(line)
    for line in by_reason(a.csv, [r for r in a.reason.split(",") if r]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

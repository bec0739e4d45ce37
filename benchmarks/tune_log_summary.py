"""One line per search of a tuner log ($QUANTBRIDGE_TUNE_LOG, kernels/int4_tuner.log_search): its key,
timing, pick, and the fastest first-pass time of a warp-specialized (ws) candidate and of a Triton one.

Where eager timing adds a launch's host cost, the ws candidates' best time sits far above their kernel
time (benchmarks/NOTES.md, sixth session): this puts the two side by side for every search.

Usage: python3 benchmarks/tune_log_summary.py LOG.jsonl [--key SUBSTRING]
       (a variants archive holds its logs: tar -xzf kernel-variants-*.tar.gz)
"""

from __future__ import annotations

import argparse
import json
import sys

WS_WARPS = 12  # int4_configs.WS_WARPS: the num_warps that marks a ws configuration


def summarize(lines: list[str], key_part: str = "") -> list[str]:
    """The summary lines of the log's searches whose key contains key_part."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        search = json.loads(line)
        if key_part not in search["key"]:
            continue
        first = [(tuple(cfg), ms * 1e3) for cfg, ms in search["first_ms"]]
        cells = []
        for name, is_ws in (("ws", True), ("triton", False)):
            timed = [(us, cfg) for cfg, us in first if (cfg[4] == WS_WARPS) == is_ws]
            us, cfg = min(timed) if timed else (None, None)
            cells.append(f"best {name} {cfg} {us:.1f} us" if timed else f"best {name} none")
        out.append(f"{search['key']}  {search['timing']}  pick {tuple(search['pick'])}  " + "  ".join(cells))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--key", default="", help="only the searches whose key contains this")
    a = ap.parse_args(argv)
    with open(a.log) as f:
        for line in summarize(f.readlines(), a.key):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

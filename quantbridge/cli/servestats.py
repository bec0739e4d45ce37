"""`quantbridge serve-stats`: what vLLM profiled while serving, merged into one per-layer table."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from quantbridge.cli import options
from quantbridge.cli.outpaths import check_writable
from quantbridge.cli.output import table_console
from quantbridge.plugin.errors import UserError
from quantbridge.results.schema import save_json
from quantbridge.vllm import stats


@click.command("serve-stats")
@click.argument("profile_dir", type=click.Path(file_okay=False))
@options.out_file(None, help="Where the merged results go (default: PROFILE_DIR/results.json).")
def serve_stats(profile_dir: str, out_file: str | None) -> None:
    """Merge what `vllm serve ... --quantization quantbridge` profiled into one per-layer table.

    PROFILE_DIR is the QUANTBRIDGE_PROFILE_DIR the server ran with: one worker-*.json per
    worker process, rewritten every QUANTBRIDGE_PROFILE_FLUSH_S seconds (default 30) while busy, when idle and at
    exit. Latency is per layer and per M (tokens in the step): median, p10, p90 and the call
    count; the merged file uses the results schema of `compare` (`quantbridge report` reads it).

    \b
    Example:
      QUANTBRIDGE_PROFILE_DIR=runs/serve vllm serve ./llama-qb --quantization quantbridge   # graphs on
      quantbridge serve-stats runs/serve
    """
    out = Path(out_file) if out_file else Path(profile_dir) / "results.json"
    if Path(profile_dir).is_dir():  # else load_workers says so, and no directory is created for a typo
        _refuse_foreign(out, bool(out_file))
        check_writable(str(out), "--out", "merged.json")
    comp = stats.merge(stats.load_workers(profile_dir, warn=lambda msg: click.echo(f"warning: {msg}", err=True)))
    if not any(r.latency_us for b in comp.backends for r in b.layers):  # nothing to tabulate: say so
        raise UserError(f"the worker files in {profile_dir} hold no timed layer call yet; send the server some "
                        f"requests and let it flush its profile (QUANTBRIDGE_PROFILE_FLUSH_S)")
    st = comp.settings
    click.echo(f"{comp.device['name']}, vLLM {st.get('vllm') or '?'}, CUDA graphs: {st.get('cudagraph_mode') or '?'}"
               f"{' (--enforce-eager)' if st.get('enforce_eager') else ''}")
    n_steps = stats.steps(comp)
    for b in comp.backends:
        ms = sorted({m for r in b.layers for m in r.latency_us}, key=int)
        if not ms:
            continue
        shown = ms if len(ms) <= 6 else ms[:3] + ms[-3:]  # the smallest and largest steps
        graph = b.timing == stats.GRAPH
        what = ("GPU time inside captured CUDA graphs per captured batch size (µs, median \\[replays])" if graph
                else "per-layer latency of eager calls while serving (µs, median \\[calls])")
        table = Table(title=f"{b.name} on {comp.device['name']}: {what}")
        for col in ["layer", "N×K", "kernel", "steps", *[f"M={m}" for m in shown]]:
            table.add_column(col, justify="left" if col in ("layer", "kernel") else "right")
        for r in b.layers:
            cells = [f"{r.latency_us[m]['median']:.1f} [{r.latency_us[m]['count']}]" if m in r.latency_us else "—"
                     for m in shown]
            table.add_row(r.name, "×".join(map(str, r.shape)), r.kernel, str(n_steps[r.name]), *cells)
        table_console().print(table)
        if graph:
            by_kind: dict[str, list[dict]] = {}
            for x in b.model_metrics["graphs"]:
                by_kind.setdefault(x.get("kind", "piecewise"), []).append(x)
            for kind, g in sorted(by_kind.items()):
                def total(key: str, g=g) -> int:
                    return sum(x.get(key, 0) for x in g)
                sizes = ", ".join(map(str, sorted({x["m"] for x in g})))
                twins = (f"; timed on the probed twins' {total('probed_replays')} replays, one step in {g[0]['every']}"
                         if "probed_replays" in g[0] else "")
                click.echo(f"{len(g)} captured {kind} graphs with quantized layers (batch sizes {sizes}); replays "
                           f"{total('replays')}, read {total('reads')} (of which waited for {total('forced_reads')}), "
                           f"warm-up replays {total('warmup_replays')}{twins}")
        else:
            total = sum(sum(v["total_us"] for v in r.latency_us.values()) for r in b.layers)
            click.echo(f"{len(b.layers)} layers, {b.model_metrics['workers']} worker file(s), {len(ms)} distinct M; "
                       f"Σ time in quantized linears {total / 1e3:.1f} ms; warm-up calls kept apart: "
                       f"{sum(b.model_metrics['warmup_calls'].values())}")
    flushes = comp.backends[0].model_metrics.get("flush_ms", [])
    if flushes:  # the profiler's own writes, on the serving process (they hold its GIL)
        n, tot = sum(f.get("count", 0) for f in flushes), sum(f.get("total", 0.0) for f in flushes)
        click.echo(f"profile flushes: {n} in {len(flushes)} worker(s), {tot:.1f} ms in all, longest "
                   f"{max(f.get('max', 0.0) for f in flushes):.1f} ms")
    overhead = stats.overhead(profile_dir)
    if overhead is not None:
        st["profiling_overhead"] = overhead
        paired = overhead.get("paired")
        # Servers held together are the figure to read; the pooled medians mix servers run at other
        # times (another call's cold server included), so the machine's drift between them is in it.
        _echo_paired(paired, "profiling overhead, servers held together, rounds taking turns:")
        _echo_paired(overhead.get("paired_control"), "  control, a second unprofiled server against the first:")
        for line in _resolution(overhead):
            click.echo(line)
        head = "  pooled medians, servers not held together" if paired else "profiling overhead"
        click.echo(f"{head} ({overhead['source']}): {overhead['tokens_per_s_off']:.1f} tokens/s unprofiled, "
                   f"{overhead['tokens_per_s_on']:.1f} profiled ({overhead['change_pct']:+.1f} %)")
        for every, e in sorted(overhead.get("by_full_every", {}).items(), key=lambda kv: int(kv[0])):
            click.echo(f"  with the FULL graphs' probed twins one step in {every}: {e['tokens_per_s']:.1f} tokens/s "
                       f"({e['change_pct']:+.1f} %, {e['rounds']} rounds)")
            _echo_paired(e.get("paired"), "    held together with an unprofiled server:")
    save_json(comp, out)
    click.echo(f"wrote {out}")


def _echo_paired(paired: dict | None, head: str) -> None:
    for kind, p in (paired or {}).items():
        click.echo(f"{head} {kind} {p['change_pct']:+.1f} % per cycle (median; quartiles {p['q1_pct']:+.1f} … "
                   f"{p['q3_pct']:+.1f} %, {p['cycles']} cycles)")


def _resolution(overhead: dict) -> list[str]:
    """One line per load saying whether the held-together run resolves the change (stats.overhead)."""
    out = []
    for kind, ok in overhead.get("resolved", {}).items():
        p, c = overhead["paired"][kind], overhead["paired_control"][kind]
        if ok:
            out.append(f"  {kind}: resolved: the profiled server moved {p['change_pct']:+.1f} %, the control "
                       f"{c['change_pct']:+.1f} %")
        else:
            out.append(f"  {kind}: not resolved: the control moved {c['change_pct']:+.1f} % against the profiled "
                       f"server's {p['change_pct']:+.1f} %; a cost this size is within this run's server-to-server "
                       f"spread")
    return out


def _refuse_foreign(out: Path, named: bool) -> None:
    """serve-stats replaces only a merge it wrote itself: any other file at `out` (a compare's
    results.json, a user's own file) is refused and named, before any work."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_file() and not out.is_symlink() and stats.is_merge(out):
        return
    where = "--out" if named else "the default output"
    raise UserError(f"{where} {out} exists and is not a merge serve-stats wrote; serve-stats replaces only its "
                    f"own: move it away or pass --out NEW_FILE")

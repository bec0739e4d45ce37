"""`quantbridge plan`: a per-layer assignment that meets a budget, from a comparison's sensitivity.

Modules that import torch are imported when the command runs, so `--help` and a refused option answer
without loading it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantbridge.cli import compare, options
from quantbridge.cli.outpaths import check_writable
from quantbridge.cli.resultfiles import load_results
from quantbridge.plugin.files import write_atomic
from quantbridge.results.plan import Budget, make_plan


@click.command()
@click.argument("source")
@click.option("--max-ppl-increase", type=float, default=None, metavar="PCT", help="Budget: perplexity increase over fp16, in percent.")
@click.option("--max-weight-gb", type=float, default=None, help="Budget: total linear-layer weight bytes, in GB (1e9).")
@click.option("--max-latency-ratio", type=float, default=None, help="Budget: Σ layer latency at --batch M over fp16's.")
@click.option("--batch", "m", type=click.IntRange(min=1), default=None,
              help="The M whose latency counts (default: the first decode M).")
@options.backends(None, help="Backends the plan may use (default: every ok one in the results; when SOURCE is a "
                             "model, the ones compared: native,bnb-int8).")
@click.option("--compare-out", default="runs/plan-compare", show_default=True, type=click.Path(file_okay=False),
              help="When SOURCE is a model: where its comparison is written.")
@options.out_file("plan.json")
def plan(source: str, max_ppl_increase: float | None, max_weight_gb: float | None,
         max_latency_ratio: float | None, m: int | None, backends: str | None, compare_out: str, out_file: str) -> None:
    """Propose a per-layer assignment (fp16, INT8 or an INT4 backend) that meets a budget.

    SOURCE is a results.json from `compare --sensitivity` (per-layer eval-loss increases),
    or a model (as for `compare`), which is then compared with --sensitivity first. The
    plan predicts weight bytes, Σ layer latency and perplexity from the per-layer numbers;
    `compare --plan` measures them. INT8 comes from bnb-int8 (bitsandbytes LLM.int8()).

    \b
    Examples:
      quantbridge compare demo --backends native,gptq,bnb-int8 --sensitivity --out runs/demo
      quantbridge plan runs/demo/results.json --max-ppl-increase 0.5 --out plan.json
      quantbridge plan demo --max-weight-gb 0.01                        # compares first
      quantbridge compare demo --plan plan.json --out runs/demo-plan     # predicted vs measured
    """
    from quantbridge.plugin import backend as registry
    from quantbridge.run.settings import Settings

    check_writable(out_file, "--out", "plan.json")  # before a comparison that may take minutes
    budget = Budget(max_ppl_increase, max_weight_gb, max_latency_ratio)
    if backends:
        registry.parse_names(backends)  # an unknown name fails now, not after a comparison
    if source.endswith(".json") or Path(source).is_file():
        results = source
    else:
        names = registry.parse_names(backends or "native,bnb-int8")
        settings = Settings(sensitivity=True, **({"batches": [m]} if m else {}))
        compare.run_compare(source, names, settings, "auto", "auto", compare_out, no_layers=True)
        results = str(Path(compare_out) / "results.json")
    comp = load_results(results)
    m = m or (comp.settings.get("decode_m") or [1])[0]
    allowed = [b.strip() for b in backends.split(",")] if backends else None
    p = make_plan(comp, budget, m, allowed)
    p["source"] = str(Path(results).resolve())
    write_atomic(out_file, json.dumps(p, indent=1) + "\n")
    pred, ref = p["predicted"], p["reference"]
    counts = {b: list(p["layers"].values()).count(b) for b in sorted(set(p["layers"].values()))}
    click.echo(f"plan: {', '.join(f'{n} layers {b}' for b, n in counts.items())}")
    click.echo(f"predicted: weights {pred['weight_bytes'] / 1e9:.4g} GB (fp16 {ref['weight_bytes'] / 1e9:.4g}), "
               f"Σ layer latency at M={m} {pred['latency_us']:.1f} µs ({pred['latency_ratio']:.2f}× fp16), "
               f"ppl {pred['eval_ppl']:.5g} ({pred['ppl_increase_pct']:+.3f} %)")
    click.echo(f"wrote {out_file}; check it with: quantbridge compare MODEL --plan {out_file}")

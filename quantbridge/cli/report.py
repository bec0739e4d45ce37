"""`quantbridge report`: a saved comparison (results.json) as terminal tables, HTML or Markdown.

Modules that import torch are imported when the command runs, so `--help` and a refused option answer
without loading it.
"""

from __future__ import annotations

from pathlib import Path

import click

from quantbridge.cli import options
from quantbridge.cli.outpaths import check_writable
from quantbridge.cli.output import table_console
from quantbridge.cli.resultfiles import load_results, write_report
from quantbridge.plugin.errors import UserError
from quantbridge.results.schema import Comparison


@click.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--html", "html_out", default=None, type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--md", "md_out", default=None, type=click.Path(dir_okay=False), help="Write a Markdown report.")
@options.layers(help="In the terminal: the per-layer table with every layer, or none [default: the 10 layers with "
                     "the largest isolated error].")
def report(results: str, html_out: str | None, md_out: str | None, layers: bool | None) -> None:
    """Render a saved comparison (results.json) as tables, or as HTML / Markdown files.

    \b
    Examples:
      quantbridge report runs/demo/results.json                       # tables in the terminal
      quantbridge report runs/demo/results.json --html r.html --md r.md
    """
    from quantbridge.report.terminal import print_comparison

    comp = load_results(results)
    empty = _nothing_to_report(comp)
    if empty:  # an empty report written with exit 0 would look like a run that measured nothing silently
        raise UserError(f"{results} has nothing to report: {empty}; pass the results.json of a `quantbridge compare` "
                        f"run (an interrupted run's rows are in OUT.partial/results.json)")
    for path, option in ((html_out, "--html"), (md_out, "--md")):
        if path:
            check_writable(path, option)
    if not html_out and not md_out:
        print_comparison(comp, table_console(), layers=layers, all_layers_hint=f"quantbridge report {results} --layers")
    for path, kind in ((html_out, "html"), (md_out, "md")):
        if path:
            click.echo(f"wrote {write_report(comp, Path(path), kind)}")


def _nothing_to_report(comp: Comparison) -> str | None:
    """Why a results file has nothing a report could show (no rows; rows with neither figures nor a reason)."""
    if not comp.backends:
        return "it holds no backend rows"
    if not any(b.layers or b.model_metrics or b.reason for b in comp.backends):
        return f"none of its {len(comp.backends)} row(s) holds a figure or a reason"
    return None

"""`quantbridge env`: the device, and which backends, quantizers and kernels can run here, or why not.

Modules that import torch are imported when the command runs, so `--help` answers without loading it.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def env(as_json: bool) -> None:
    """Show torch/CUDA/GPU facts and what can run here: backends, quantizers and kernels, each
    with its library and version, or why it cannot run and how to install it.

    \b
    A backend (what --backends takes) is a quantizer's weights through the first of its
    kernels that can run them here; --weights Q --kernels K1,K2 runs one quantizer's weights
    through chosen kernels.

    \b
    Example:
      quantbridge env
      quantbridge env --json
    """
    import torch

    from quantbridge.measure.hardware import device_info
    from quantbridge.plugin import backend as registry
    from quantbridge.plugin import resolve
    from quantbridge.plugin.kernel import kernel_names
    from quantbridge.plugin.quantizer import quantizer_names

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = device_info(dev)

    def describe(r: resolve.Resolved) -> dict:
        row = {r.kind: r.name, "available": r.ok, "reason": r.reason,
               "install": None if r.ok else r.install_hint or None, "description": r.obj.description}
        if r.kind == "backend":
            row.update(quantizer=r.obj.quantizer, kernels=list(r.obj.kernels))
        return row

    sections = {
        "backends": [describe(resolve.backend(n, dev)) for n in registry.names()],
        "quantizers": [describe(resolve.quantizer(n, dev)) for n in quantizer_names()],
        "kernels": [describe(resolve.kernel(n, dev)) for n in kernel_names()],
    }
    if as_json:
        click.echo(json.dumps({"device": info, **sections}, indent=1))
        return
    console = Console()
    console.print(f"[bold]device[/bold] {info['name']} ({dev.type})   torch {torch.__version__}   CUDA {info['torch_cuda']}")
    for k in ("capability", "sm_count", "memory_gib", "driver", "sm_clock_mhz", "mem_clock_mhz", "nvml"):
        if k in info:
            console.print(f"  {k}: {info[k]}")
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v)
    console.print(f"  libraries: {libs}")
    for title, rows in sections.items():
        kind = title[:-1]
        t = Table(title=title)
        for col in (kind, "available", "why", "description"):
            t.add_column(col)
        for r in rows:
            why = r["reason"] + (" — install: below" if r["install"] and r["install"] not in r["reason"] else "")
            desc = escape(r["description"]) + (f" [dim](quantizer {r['quantizer']}, kernels {', '.join(r['kernels'])})[/dim]"
                                       if r.get("kernels") else "")
            t.add_row(r[kind], "[green]yes[/green]" if r["available"] else "[red]no[/red]", escape(why), desc)
        console.print(t)
    _print_install_hints(sections)


def _print_install_hints(sections: dict) -> None:
    """Each install command whole, on a line of its own (never inside a table cell that would cut
    it at the terminal's width), under the names it makes runnable."""
    commands: dict[str, dict[str, list[str]]] = {}
    for title, rows in sections.items():
        for r in rows:
            if r["install"]:
                commands.setdefault(r["install"], {}).setdefault(title[:-1], []).append(r[title[:-1]])
    if not commands:
        return
    click.echo("\nto install what is missing here (each command whole, on one line):")
    for command, names in commands.items():
        click.echo("  " + "; ".join(f"{kind} {', '.join(ns)}" for kind, ns in names.items()) + ":")
        click.echo(f"    {command}")

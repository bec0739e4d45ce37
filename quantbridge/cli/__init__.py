"""The `quantbridge` command line: the command group and its commands, one module each. Thin: parse,
call the library, print.

User errors print one line and exit with code 2; nothing a user can fix shows a traceback
(output.CommandGroup). Options more than one command takes are declared once, in options.py.
"""

from __future__ import annotations

import click

from quantbridge import __version__
from quantbridge.cli import bench, compare, convert, env, plan, report, servestats
from quantbridge.cli.output import CommandGroup
from quantbridge.files import faults


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantbridge")
def cli() -> None:
    """Compare INT4 linear-layer backends on the same model, per layer, measured honestly.

    \b
    Start with:
      quantbridge env                                   # what can run here, and why not
      quantbridge compare demo --backends fp16,native   # SmolLM2-135M, a real trained model
      quantbridge compare tiny --backends fp16,native   # a seeded random model: seconds
    """


cli.add_command(compare.compare)
cli.add_command(bench.bench)
cli.add_command(convert.convert)
cli.add_command(plan.plan)
cli.add_command(report.report)
cli.add_command(env.env)
cli.add_command(servestats.serve_stats)


def main() -> None:
    """The `quantbridge` entry point."""
    faults.install()  # SIGTERM and SIGHUP end a command as Ctrl-C does: cleaned up, one line, exit 128+signal
    try:
        cli(prog_name="quantbridge")
    finally:
        faults.settle()  # a Ctrl-C during the interpreter's own shutdown leaves the exit status as it is


if __name__ == "__main__":
    main()

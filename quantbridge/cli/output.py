"""What every command prints the same way: exit statuses, one-line errors, progress, wide tables."""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.progress import Progress

from quantbridge.files import faults
from quantbridge.plugin.errors import UserError

# Exit statuses: 0 every requested row ran; EXIT_ROWS_FAILED the results are written but a requested
# row failed or could not run; 2 bad input (or a row that cannot run here), refused before any work;
# 130 interrupted.
EXIT_ROWS_FAILED = 1
EXIT_STATUS_HELP = """\b
Exit status: 0 every requested row ran; 1 the results were written but a requested row
failed or could not run (each such row is named on stderr, one line each, with its fix);
2 bad input, or a requested row that cannot run here, refused before any work (with
--skip-unavailable such a row is recorded as unavailable instead and does not count);
130 interrupted.
"""


class UserFacingError(click.ClickException):
    exit_code = 2


class CommandGroup(click.Group):
    """Turns UserError from any command into click's one-line 'Error: ...' with exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise UserFacingError(str(e)) from None
        except faults.WriteFailed as e:  # a disk that filled up mid-command, in one line with its errno's hint
            raise UserFacingError(f"could not write {e}") from None
        except KeyboardInterrupt as e:  # SIGINT, SIGTERM or SIGHUP in a command without its own message
            stop = faults.as_interrupted(e)
            click.echo(f"{stop.label}: {stop.state or 'stopped before it finished'}", err=True)
            raise click.exceptions.Exit(stop.exit_code) from None


def exit_if_rows_failed(lines: list[str]) -> None:
    """The results are written; each requested row that did not run is one 'Error:' line on stderr, and
    the exit status says the run did not measure all that was asked."""
    for line in lines:
        click.echo(f"Error: {line}", err=True)
    if lines:
        sys.exit(EXIT_ROWS_FAILED)


def table_console() -> Console:
    """Tables on stdout: piped output gets a wide table rather than rich's 80-column default."""
    return Console(width=None if sys.stdout.isatty() else 160)


class RichProgress:
    """A run's `begin`/`advance` calls as rich's bar (stderr is a terminal)."""

    def __init__(self, progress: Progress) -> None:
        self.p, self.task = progress, None

    def begin(self, description: str, total: int) -> None:
        if self.task is not None:
            self.p.remove_task(self.task)
        self.task = self.p.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)


class LineProgress:
    """Progress where stderr is not a terminal (a log file, a pipe, CI), where rich's bar and spinner
    show nothing: a line when each stage begins, and while it runs a line per step of a stage of
    few steps (each M, each row's part) or every EVERY_S seconds, so a long run is never silent."""

    EVERY_S = 5.0
    FEW = 8

    def __init__(self, console: Console) -> None:
        self.console, self.start = console, time.monotonic()
        self.description, self.total, self.done, self.last = "", 0, 0, self.start

    def line(self, text: str) -> None:
        s = int(time.monotonic() - self.start)
        self.console.print(f"[{s // 60:d}:{s % 60:02d}] {text}", markup=False, highlight=False, soft_wrap=True)

    def begin(self, description: str, total: int) -> None:
        self.description, self.total, self.done, self.last = description, total, 0, time.monotonic()
        self.line(description + (f" (0/{total})" if total > 1 else ""))

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.total > 1 and (self.total <= self.FEW or self.done >= self.total or now - self.last >= self.EVERY_S):
            self.last = now
            self.line(f"{self.description}: {self.done}/{self.total}")

"""What the bad-input and fault tests share: invoking the CLI, the one-line-error check, snapshots."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from quantbridge.cli import cli

# compare flags for a run of seconds on the tiny model
FAST = ["--runs", "5", "--warmup", "0", "--batch", "1", "--prefill", "0", "--eval-len", "16", "--eval-seqs", "1"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, needle: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `Error` line, holding `needle`; returns that line."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    assert needle in errors[0], r.output
    return errors[0]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def previous_in(tmp_path: Path, previous: Path) -> Path:
    """A copy of a complete run at tmp_path/runs/latest, beside a file of the user's own."""
    out = tmp_path / "runs" / "latest"
    shutil.copytree(previous, out)
    (tmp_path / "runs" / "sentinel.txt").write_text("keep me")
    return out

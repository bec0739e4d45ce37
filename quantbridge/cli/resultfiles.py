"""A saved results.json read back for `report` and `plan`, and the report documents written from one.

quantbridge.report.document imports torch: it is imported when a document is rendered, so the
commands' `--help` and their refusals of bad input answer without loading it.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantbridge.files import faults
from quantbridge.plugin.errors import UserError
from quantbridge.plugin.files import write_atomic
from quantbridge.results import schema
from quantbridge.results.schema import Comparison


def load_results(path: str) -> Comparison:
    """A results.json as a Comparison, or one line saying why it is not one."""
    if not Path(path).is_file():
        raise UserError(f"results file {path!r} does not exist; run `quantbridge compare ... --out DIR` first")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a quantbridge results.json: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a quantbridge results.json: it holds a JSON {type(data).__name__}, "
                        f"not an object; pass the results.json `quantbridge compare` wrote")
    newer = schema.newer_schema(data)
    if newer:
        raise UserError(f"{path}: {newer}")
    try:
        return schema.check_loaded(Comparison.from_dict(data))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a quantbridge results.json: {e}") from None


def render_report(comp: Comparison, kind: str = "html") -> str:
    """The HTML (or Markdown) report of a comparison."""
    from quantbridge.report.document import to_html, to_markdown

    try:
        return to_html(comp) if kind == "html" else to_markdown(comp)
    except ImportError as e:  # matplotlib missing (a core dependency): a broken install
        raise UserError(f"the HTML report needs matplotlib ({e}); pip install matplotlib or pass --no-report") from None


def write_report(comp: Comparison, path: Path, kind: str = "html") -> Path:
    """render_report written atomically to `path`; a write that fails is one line."""
    text = render_report(comp, kind)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {faults.describe(e)}") from None
    return path

"""The direction of imports (pyproject.toml's [tool.importlinter] contracts): parts import only the
parts below them, adapters and kernels only the plugin interfaces and the format codecs, and no
two modules import each other. A new circle or an upward import fails here, in CI."""

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    assert find_spec("importlinter"), "import-linter is not installed: pip install -e '.[test]' (bash .ci/setup)"
    r = subprocess.run(["bash", str(ROOT / ".ci" / "import_contracts")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout

"""The bad-input sweep (``benchmarks/bad_inputs.py``) on every 8th case: each bad input ends with one
clear error line and a non-zero exit, no traceback, no code run from a crafted file, and the
finished run it was pointed at unchanged. The full sweep (140+ cases) is run by hand; its result
is committed as benchmarks/results/bad_inputs.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])  # benchmarks/ is not part of the package
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.bad_inputs import cases, main  # noqa: E402


def test_the_sweep_has_over_100_distinct_cases():
    names = [c.name for c in cases()]
    assert len(names) >= 100 and len(set(names)) == len(names)


def test_quick_sweep_passes(tmp_path):
    out = tmp_path / "sweep.json"
    assert main(["--quick", "--json", str(out)]) == 0, json.loads(out.read_text())["cases"]
    summary = json.loads(out.read_text())["summary"]
    assert summary["cases"] >= 15 and summary["tracebacks"] == summary["code_executed"] == 0
    assert summary["artifacts_changed"] == 0

"""Importing dpt_engine does nothing to the process: no environment variable set, nothing
registered with torch-fidelity. The ``dpt`` command sets its defaults when it starts, before
torch loads (OpenMP reads ``OMP_WAIT_POLICY`` when torch loads its runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpt_engine import cli

ROOT = Path(__file__).resolve().parents[1]

# torch._dynamo (imported by torch-fidelity) sets this one itself when it is imported
_TORCH_OWN = {"TORCHINDUCTOR_CACHE_DIR"}

_IMPORT_ALL = """
import json, os, sys
before = dict(os.environ)
import dpt_engine, dpt_engine.cli
cli_loads_torch = "torch" in sys.modules
import dpt_engine.eval.fid, dpt_engine.kernels, dpt_engine.pipeline, dpt_engine.sampling
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "cli_loads_torch": cli_loads_torch,
                  "registered": "dpt-inception-v3-tf" in FEATURE_EXTRACTORS_REGISTRY}))
"""

_CLI_START = """
import os, sys
from dpt_engine import cli
original = cli.set_process_defaults
def spy():
    print("torch loaded before the defaults:", "torch" in sys.modules)
    original()
cli.set_process_defaults = spy
assert cli.main(["config", "--preset", "digits"]) == 0
print("OMP_WAIT_POLICY =", os.environ.get("OMP_WAIT_POLICY"))
"""


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", *_TORCH_OWN)}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def test_importing_the_package_changes_nothing() -> None:
    pytest.importorskip("torch_fidelity")
    got = json.loads(_python(_IMPORT_ALL).strip().splitlines()[-1])
    assert set(got["changed"]) <= _TORCH_OWN, got["changed"]
    assert not got["registered"], "importing dpt_engine.eval.fid must not register with torch-fidelity"
    assert not got["cli_loads_torch"], "dpt_engine.cli must import without torch (main sets OpenMP first)"


def test_dpt_sets_passive_omp_wait_before_torch_loads() -> None:
    out = _python(_CLI_START)
    assert "torch loaded before the defaults: False" in out, out
    assert "OMP_WAIT_POLICY = PASSIVE" in out, out


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_dpt_keeps_a_wait_policy_the_user_chose(user_value, monkeypatch, capsys) -> None:
    if user_value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user_value)
    assert cli.main(["presets"]) == 0
    capsys.readouterr()
    assert os.environ["OMP_WAIT_POLICY"] == (user_value or "PASSIVE")

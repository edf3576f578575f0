"""The GPU check cannot rot: ``bash benchmarks/gpu_check.sh --dry-run`` runs every phase of the
real check on this CPU (tiny shapes, the Triton interpreter, ``--device cpu``) and must pass and
write its files; the real (GPU) settings must still describe what the check promises.

The dry run skips the ``build`` and ``tests`` phases here (the native library is built by
``make setup``, and the kernel tests run in this suite anyway); what remains is setup (reusing
``.venv``), the import check and the whole measurement driver: about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
PHASES = [p.name for p in gpu_check.PHASES]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check_dry_run")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DPT_KERNELS", "TRITON_INTERPRET")}
    env.update(GPU_CHECK_OUT_DIR=str(out), GPU_CHECK_SKIP="build tests", GPU_CHECK_PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return res, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_dry_run_passes_and_writes_the_summary_files(dry_run) -> None:
    res, out = dry_run
    report = f"exit {res.returncode}\n{res.stdout[-8000:]}\n{res.stderr[-3000:]}"
    assert res.returncode == 0, report
    for name in ("summary.md", "gpu_check.log", "phases.tsv", "rows.jsonl", "gpu_check.json", "gpu_check.md",
                 "imports.json"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing\n{report}"
    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    assert [p[0] for p in phases] == ["setup", "build", "bench", "tests_gpu", "tests_kernels_cpu"]
    assert {p[0]: p[1] for p in phases} == {
        "setup": "0",
        "build": "skipped",
        "bench": "0",
        "tests_gpu": "skipped",
        "tests_kernels_cpu": "skipped",
    }
    summary = (out / "summary.md").read_text()
    assert "gpu_check --dry-run" in summary and "### (a) Correctness" in summary
    imports = json.loads((out / "imports.json").read_text())
    assert imports["ok"] and all(v.startswith("ok") for v in imports["required"].values())


def test_dry_run_every_phase_in_order_of_value(dry_run) -> None:
    _, out = dry_run
    rows = _rows(out)
    status = {
        r["variant"]: r["config"]
        for r in rows
        if r["benchmark"] == "gpu_check" and r["metric"] == "phase_seconds"
    }
    assert list(status) == PHASES
    assert all(st["status"] == "ok" for st in status.values()), status
    # rows are appended phase by phase, in the order of value
    order = [r["phase"] for r in rows if r["phase"] != "env"]
    assert order == sorted(order, key=PHASES.index)
    assert {r["phase"] for r in rows} == {"env", *PHASES}
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["rows"] == rows and [p["name"] for p in doc["phases"]] == PHASES
    assert not [r for r in rows if r["metric"] == "error"], [r for r in rows if r["metric"] == "error"]


def test_dry_run_correctness_compares_every_kernel_with_its_reference(dry_run) -> None:
    _, out = dry_run
    rows = [r for r in _rows(out) if r["benchmark"] == "correctness"]
    checked = [r for r in rows if r["metric"] == "max_abs_error"]
    assert checked and all(r["config"]["passed"] for r in checked)
    ran = {(r["variant"], r["config"]["dtype"]) for r in checked}
    # the Triton kernels (interpreted) of all three ops, both entry points of attention
    for entry in ("attention:triton", "attention_qkvpacked:triton", "ema_update_:triton",
                  "sample_multistep_fused:triton"):  # fmt: skip
        assert (entry, "float32") in ran, entry
    assert ("ema_update_:triton", "bfloat16") in ran and ("sample_multistep_fused:triton", "bfloat16") in ran
    assert ("attention:reference", "bfloat16") in ran  # SDPA is held to the same oracle
    # what a CPU cannot check is skipped with a reason, never silently
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert all(r["config"]["reason"] for r in skipped)
    assert any("bf16 tl.dot" in r["config"]["reason"] for r in skipped if r["variant"] == "attention:triton")
    exact = [r for r in checked if r["variant"].startswith(("ema_update_", "sample_multistep_fused"))]
    assert exact and all(r["config"]["rule"] == "bit-exact" and r["value"] == 0.0 for r in exact)


def test_dry_run_measures_every_benchmark(dry_run) -> None:
    _, out = dry_run
    rows = _rows(out)

    def metric(phase: str, benchmark: str, variant: str, name: str) -> list[dict]:
        return [
            r
            for r in rows
            if (r["phase"], r["benchmark"], r["variant"], r["metric"]) == (phase, benchmark, variant, name)
        ]

    for mode in ("attention_fwd", "attention_fwd_bwd"):
        for provider in ("triton", "triton-qkvpacked", "sdpa-flash"):
            got = metric("attention", mode, provider, "tflops")
            assert {r["config"]["head_dim"] for r in got} == {64, 72}, (mode, provider)
            assert all(r["value"] > 0 for r in got)
    for variant in ("foreach-lerp", "triton", "flat-lerp", "copy"):
        assert metric("ema", "ema_cuda", variant, "bandwidth")[0]["value"] > 0
    assert metric("ema", "ema_cuda", "triton", "speedup")[0]["baseline"] == "foreach-lerp"
    assert metric("solver", "solver_step_cuda", "triton", "speedup")
    for net in ("stand-in", "uvit-tiny8"):
        assert metric("solver", "sampling_loop", f"{net}:reference", "ms_per_step")
        diff = metric("solver", "sampling_loop", f"{net}:triton", "rel_diff")
        assert diff and diff[0]["value"] == 0.0  # same network outputs, bit-exact steps
    train = {r["variant"] for r in rows if r["phase"] == "train" and r["metric"] == "mfu"}
    assert train == {"original", "dpt_engine-fp32", "dpt_engine-bf16", "dpt_engine-bf16-compile"}
    sampling = [r for r in rows if r["phase"] == "sampling" and r["metric"] == "speedup"]
    assert {(r["variant"], r["baseline"], r["config"]["steps"]) for r in sampling} == {
        ("dpt_engine-fused", "naive-original", 3),
        ("dpt_engine-fused", "naive-original", 5),
    }
    assert (out / "attention_d72.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_settings_describe_the_promised_check() -> None:
    """What the GPU run measures (it cannot be run here): the issue's shapes, models and budget."""
    s = gpu_check.settings_for(dry_run=False)
    assert not s.dry_run and s.attn_dtype == "bf16"
    assert (s.attn_heads, s.attn_seq, s.attn_head_dims) == (16, 258, (64, 72))
    assert {(r.model, r.batch) for r in s.train_runs} == {
        (m, b) for m in ("uvit-l2", "uvit-h2") for b in (64, 128)
    }
    compiled = {(r.model, r.batch) for r in s.train_runs if r.variants == ("dpt_engine-bf16-compile",)}
    assert compiled == {(r.model, r.batch) for r in s.train_runs}
    eager_first = [r.variants == ("dpt_engine-bf16-compile",) for r in s.train_runs]
    assert eager_first == sorted(eager_first)  # every eager run before the first compile
    assert (s.sample_model, s.sample_steps) == ("uvit-h2", (20, 50))
    from dpt_engine.models.uvit import create_uvit

    with torch.device("meta"):
        params = sum(p.numel() for p in create_uvit(s.ema_model).parameters())
    assert 495e6 < params < 505e6  # U-ViT-H/2's 501M
    # the driver's phases fit in the 8 minutes together with setup and build on an H200
    assert sum(s.phase_caps.values()) <= 470 and list(s.phase_caps) == PHASES
    dry = gpu_check.settings_for(dry_run=True)
    assert dry.dry_run and list(dry.phase_caps) == PHASES and sum(dry.phase_caps.values()) <= 300


def test_phase_caps_keep_the_later_phases_floors() -> None:
    s = gpu_check.settings_for(dry_run=False)
    # plenty of budget: every phase gets its own cap
    assert [gpu_check.phase_cap(s, PHASES, i, 10_000) for i in range(len(PHASES))] == [
        s.phase_caps[p] for p in PHASES
    ]
    # a short budget at training: training shrinks so that sampling keeps its floor
    i = PHASES.index("train")
    assert gpu_check.phase_cap(s, PHASES, i, 200) == 200 - s.phase_floors["sampling"]
    # nearly nothing left: a phase still gets its floor (or what is left), never more than is left
    assert gpu_check.phase_cap(s, PHASES, 0, 40) == s.phase_floors["correctness"]
    assert gpu_check.phase_cap(s, PHASES, 0, 10) == 10


def test_summary_marks_failures_and_phases_not_run() -> None:
    meta = {
        "versions": {k: "x" for k in ("python", "torch", "cuda", "triton", "numpy", "diffusers", "xformers",
                                      "device", "commit")},
        "dry_run": False, "budget": 480.0, "elapsed": 12.0, "date": "d", "selected": PHASES,
    }  # fmt: skip
    statuses = [{"letter": "a", "name": "correctness", "status": "failed", "rc": 1, "seconds": 9.0, "cap": 60.0,
                 "note": "a check failed"}]  # fmt: skip
    bad = {"phase": "correctness", "benchmark": "correctness", "variant": "attention:triton", "metric": "max_abs_error",
           "value": 0.5, "unit": "abs", "baseline": None, "config": {"passed": False, "dtype": "bfloat16",
           "case": "2x16x258x72", "bound": 0.01, "rule": "<= 2 x PyTorch's error"}}  # fmt: skip
    md = gpu_check.summary_markdown(meta, statuses, [bad])
    assert "| a | correctness |" in md and "failed" in md
    assert "0 passed, 1 failed" in md and "**FAIL**" in md
    assert "| b | attention |" in md and "not run yet" in md

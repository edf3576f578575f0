"""The quality benchmark's driver: run plan, aggregation, and one shrunken end-to-end run."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.quality.diagnose import main as diagnose_main
from benchmarks.quality.diagnose import merge_earlier
from benchmarks.quality.run_quality import _machines, aggregate, main, plan_runs
from dpt_engine.utils.io import read_json


def test_plan_runs_full_pipeline_extra_seeds_and_references():
    runs = plan_runs([1, 4], seeds=[0], classifier_only_seeds=[0, 1], references=True)
    names = [r["name"] for r in runs]
    # long runs first, the cheap stage-1-only seeds last (they fill the gaps under --jobs)
    assert names == ["k1_s0", "k4_s0", "true_labels", "unconditional", "k1_s1", "k4_s1"]
    with_abl = [r["name"] for r in plan_runs([1], [0], [], references=False, ablations=True)]
    assert with_abl == ["k1_s0", "k1_s0_nopseudo"]
    full = {r["name"]: r for r in runs}
    assert full["k1_s0"]["stages"] == ["stage1", "stage2", "sample", "stage3"]
    assert full["k1_s1"]["stages"] == ["stage1"]  # seed 0 is not duplicated as a classifier-only run
    assert "data.labels_per_class=4" in full["k4_s1"]["overrides"]
    assert "data.seed=1" in full["k4_s1"]["overrides"]
    assert full["true_labels"]["overrides"][0] == "stage2.label_source=true"
    assert full["unconditional"]["stages"] == ["stage2", "sample"]


def test_aggregate_means_and_sample_std_over_seeds():
    recs = [
        {"kind": "dpt", "labels_per_class": 2, "metrics": {"stage1.top1": 50.0, "stage3.gain": 1.0}},
        {"kind": "stage1-only", "labels_per_class": 2, "metrics": {"stage1.top1": 60.0}},
        {"kind": "reference-true", "labels_per_class": None, "metrics": {"generation.fid": 12.5}},
    ]
    agg = aggregate(recs)
    s1 = agg["by_labels_per_class"][2]["stage1_top1"]
    assert s1["mean"] == 55.0 and s1["n"] == 2
    assert s1["std"] == pytest.approx(statistics.stdev([50.0, 60.0]))
    assert agg["by_labels_per_class"][2]["stage3_gain"]["std"] is None  # one value: no std
    assert agg["reference_fid"] == {"true": 12.5}


def test_header_names_every_machine_the_runs_ran_on():
    recs = [{"device": "Intel Xeon (2 threads)"}] * 3 + [{"device": "AMD EPYC (2 threads)"}, {}]
    assert _machines(recs, "AMD EPYC (2 threads)") == (
        "Intel Xeon (2 threads): 3 runs; AMD EPYC (2 threads): 1 run; machine not recorded: 1"
    )
    assert _machines([{}], "this one") == "this one"


def test_diagnosis_keeps_earlier_runs_and_names_the_oracle_of_each():
    oracle = {"backbone": "cnn-small", "dataset": "fashion-mnist", "num_train": 60000, "steps": 1000}
    oracle = {**oracle, "batch_size": 128, "test_top1": 88.3}
    earlier = {
        "oracle": {**oracle, "test_top1": 88.0},  # the same recipe trained on another machine
        "runs": [
            {"run": "k1_s0", "v": "old"},
            {"run": "k2_s0", "v": "old"},
            {"run": "true_labels", "v": "old", "oracle_test_top1": 87.5},
        ],
        "checkpoint_sweep": [{"run": "k1_s0", "step": 5}, {"run": "k2_s0", "step": 5}],
    }
    new = [{"run": "k2_s0", "v": "new"}, {"run": "k10_s1", "v": "new"}, {"run": "k2_s2", "v": "new"}]
    recs, sweep, note = merge_earlier(earlier, oracle, new, [{"run": "k2_s0", "step": 9}])
    # a run diagnosed here replaces its earlier record; the others stay, in run order, each with
    # the top-1 of the oracle that measured it
    assert [(r["run"], r["v"], r["oracle_test_top1"]) for r in recs] == [
        ("k1_s0", "old", 88.0),
        ("k2_s0", "new", 88.3),
        ("k2_s2", "new", 88.3),
        ("k10_s1", "new", 88.3),
        ("true_labels", "old", 87.5),
    ]
    assert sweep == [{"run": "k1_s0", "step": 5}, {"run": "k2_s0", "step": 9}]
    assert "k1_s0" in note and "true_labels" in note
    # another oracle recipe: earlier records are left out, and the note says so
    recs, sweep, note = merge_earlier({**earlier, "oracle": {**oracle, "steps": 2000}}, oracle, new, [])
    assert [r["run"] for r in recs] == ["k2_s0", "k2_s2", "k10_s1"] and sweep == []
    assert "left out" in note and "k1_s0" in note
    assert merge_earlier(None, oracle, new, [])[2] is None


@pytest.mark.slow
def test_smoke_run_writes_results_and_resumes(tmp_path):
    """The whole loop on the digits preset, shrunk: results agree with each run's own report."""
    results = tmp_path / "results"
    argv = [
        "--preset",
        "digits",
        "--scale",
        "smoke",
        "--labels",
        "1",
        "--seeds",
        "0",
        "--classifier-only-seeds",
        "1",
        "--no-references",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--set",
        "data.max_train=300",
        "sample.images_per_class=4",
        "sample.fid_num_images=16",
    ]
    # both runs at once in two worker processes, then (below) the sequential path
    assert main([*argv, "--jobs", "2"]) == 0
    out = read_json(results / "quality_fashion_mnist.json")
    assert out["meta"]["complete"] and out["meta"]["scale"] == "smoke"
    by_name = {r["name"]: r for r in out["runs"]}
    assert set(by_name) == {"k1_s0", "k1_s1", "k1_s0_nopseudo"}
    # the ablation: stage 3 once more on k1_s0's own stage 1 and samples, without the pseudo images
    abl = tmp_path / "runs" / "k1_s0_nopseudo"
    assert (
        (abl / "stage1").is_symlink() and (abl / "sample").is_symlink() and not (abl / "stage3").is_symlink()
    )
    assert by_name["k1_s0_nopseudo"]["metrics"]["stage3.num_pseudo"] == 0
    report = json.loads((tmp_path / "runs" / "k1_s0" / "report.json").read_text())
    assert by_name["k1_s0"]["metrics"]["stage3.top1"] == report["metrics"]["stage3.top1"]
    agg = out["aggregate"]["by_labels_per_class"]["1"]
    assert agg["stage1_top1"]["n"] == 2
    assert agg["stage3_top1"]["n"] == 1 and agg["fid_pseudo"]["mean"] > 0
    effect = by_name["k1_s0"]["metrics"]["stage3.top1"] - by_name["k1_s0_nopseudo"]["metrics"]["stage3.top1"]
    assert agg["stage3_top1_no_pseudo"]["n"] == 1 and agg["pseudo_image_effect"]["mean"] == pytest.approx(
        effect
    )
    assert (results / "quality_fashion_mnist.png").stat().st_size > 1000
    md = (results / "quality_fashion_mnist.md").read_text()
    assert "| 1 |" in md and "DPT on digits" in md
    # the per-seed values behind the means, each gain with its paired interval from the run's report
    lo, hi = report["stage3"]["gain_stats"]["ci95"]
    assert by_name["k1_s0"]["stage3_gain_ci95"] == [lo, hi]
    assert by_name["k1_s0"]["num_eval"] == report["num_eval"] > 0
    assert f"test split of {report['num_eval']:,} images" in md
    assert f"({lo:+.1f}..{hi:+.1f})" in next(line for line in md.splitlines() if line.startswith("| k1_s0 |"))
    # a second call finds every stage done and only re-reads the reports: no stage artifact is rewritten
    stage_files = {
        p: p.stat().st_mtime_ns
        for p in (tmp_path / "runs").rglob("*")
        if p.is_file() and p.parent.name.startswith(("stage", "sample"))
    }
    assert any(p.parent.name == "stage3" for p in stage_files)
    assert main(argv) == 0
    again = read_json(results / "quality_fashion_mnist.json")
    assert again["aggregate"] == out["aggregate"]
    assert {p: p.stat().st_mtime_ns for p in stage_files} == stage_files
    # --no-run only aggregates: a plan with one more seed lists it as missing and runs nothing
    assert main([*argv, "--no-run", "--classifier-only-seeds", "1", "2"]) == 0
    partial = read_json(results / "quality_fashion_mnist.json")
    assert partial["meta"]["missing"] == ["k1_s2"] and not partial["meta"]["complete"]
    assert partial["aggregate"] == out["aggregate"] and not (tmp_path / "runs" / "k1_s2").exists()
    # a call for part of the benchmark (here without the stage-1-only seed) keeps the runs of other
    # calls in the tables, from their committed records
    i = argv.index("--classifier-only-seeds")
    assert main([*argv[:i], *argv[i + 2 :], "--no-run"]) == 0
    part = read_json(results / "quality_fashion_mnist.json")
    assert [r["name"] for r in part["runs"]] == ["k1_s0", "k1_s1", "k1_s0_nopseudo"]
    assert part["aggregate"] == out["aggregate"] and part["meta"]["complete"]

    # the diagnosis re-evaluates the saved classifiers: same test top-1 as the pipeline reported
    diag_argv = ["--out", str(tmp_path / "runs"), "--preset", "digits", "--oracle-steps", "30"]
    diag_argv += ["--sweep", "k1_s0", "--sweep-per-class", "2"]
    assert diagnose_main([*diag_argv, "--results", str(results), "--no-progress"]) == 0
    diag = read_json(results / "quality_fashion_mnist_diagnosis.json")
    assert [r["run"] for r in diag["runs"]] == ["k1_s0"]  # k1_s1 ran stage 1 only: nothing generated
    d = diag["runs"][0]
    assert d["stage1_test_top1"] == pytest.approx(report["metrics"]["stage1.top1"], abs=1e-6)
    assert d["stage3_test_top1"] == pytest.approx(report["metrics"]["stage3.top1"], abs=1e-6)
    assert d["num_generated"] == report["metrics"]["generation.num_images"]
    assert 0.0 <= d["class_fidelity"] <= 100.0 and len(d["class_fidelity_per_class"]) == 10
    assert diag["oracle"]["test_top1"] > 50.0  # 30 supervised steps on all digits already beat chance
    kept = sorted(
        p.parent.name for p in (tmp_path / "runs/k1_s0/stage2/checkpoints").glob("step-*/model_optim.pt")
    )
    assert [f"step-{r['step']:08d}" for r in diag["checkpoint_sweep"]] == kept and kept
    assert all(
        r["num_images"] == 20 and 0.0 <= r["class_fidelity"] <= 100.0 for r in diag["checkpoint_sweep"]
    )
    # each finished run is committed on its own with its wall time per stage and threads; a fresh
    # machine (no run directories) rebuilds the aggregate from them without recomputing anything
    import shutil

    rec = read_json(results / "quality_fashion_mnist_runs" / "k1_s0.json")
    assert (
        rec["device"].endswith(f"({rec['threads']} threads)")
        and rec["device"] in (results / "quality_fashion_mnist.md").read_text()
    )
    assert rec["threads"] >= 1 and set(rec["wall_time_s"]) == {"stage1", "stage2", "sample", "stage3"}
    assert not any("fid_cache" in o for o in rec["overrides"])
    shutil.rmtree(tmp_path / "runs")
    assert main(argv) == 0
    assert read_json(results / "quality_fashion_mnist.json")["aggregate"] == out["aggregate"]
    assert not (tmp_path / "runs" / "k1_s0").exists()
    # a changed config is not served from the old record
    assert (
        main(
            [
                *argv,
                "--no-run",
                "--set",
                "data.max_train=300",
                "sample.images_per_class=4",
                "sample.fid_num_images=16",
                "stage3.steps=59",
            ]
        )
        == 0
    )
    assert read_json(results / "quality_fashion_mnist.json")["meta"]["missing"] == [
        "k1_s0",
        "k1_s0_nopseudo",
        "k1_s1",
    ]

"""Smoke tests of the benchmark harness and the sampler benchmark (tiny settings, no speed
assertions: benchmarks are not tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# `benchmarks/` is a top-level folder of the repository, not part of the installed package:
# make it importable under a bare `pytest` too (`python -m pytest` already has the cwd on sys.path).
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.harness import ROW_FIELDS, measure_alternating, paired_ratio, summarize  # noqa: E402


def test_measure_alternating_interleaves_and_pairs() -> None:
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = measure_alternating(variants, repeats=3, warmup=2, sync=None)
    assert calls == ["a", "b", "c"] * 5  # warm-up rounds, then timed rounds, interleaved
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
    with pytest.raises(ValueError):
        measure_alternating(variants, repeats=0)


def test_summarize_and_paired_ratio() -> None:
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s == {"p20": 1.8, "p50": 3.0, "p80": 4.2, "mean": 3.0}
    # per-round ratios 2, 2, 10 -> median 2 (a ratio of medians would give 2.5 / 1 = 2.5)
    assert paired_ratio([2.0, 4.0, 10.0], [1.0, 2.0, 1.0]) == 2.0
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers
def test_sampler_benchmark_writes_rows_and_outputs_agree(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from benchmarks.bench_sampler import LOOP_VARIANTS, VARIANTS, main

    out_json, out_png = tmp_path / "rows.json", tmp_path / "chart.png"
    # one thread: a multi-threaded pool slows down badly when other jobs share the 2 cores
    argv = ["--batch", "4", "--steps", "3", "--repeats", "1", "--threads", "1"]
    argv += ["--json", str(out_json), "--png", str(out_png)]
    returned = main(argv)

    rows = json.loads(out_json.read_text())
    assert rows == returned
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in rows:
        assert tuple(r) == ROW_FIELDS
        assert r["benchmark"] == "sampler" and r["variant"] in VARIANTS
        assert isinstance(r["value"], float) and isinstance(r["unit"], str) and r["unit"]
        assert r["config"]["batch"] == 4 and r["config"]["steps"] == 3 and r["config"]["threads"] == 1
        assert r["device"] and r["torch"] and r["commit"] and r["timestamp"]

    by_key = {(r["variant"], r["metric"], r["baseline"]): r for r in rows}
    for v in VARIANTS:
        tp, lat = by_key[v, "throughput", None], by_key[v, "seconds_per_batch", None]
        assert tp["value"] > 0 and tp["p20"] <= tp["value"] <= tp["p80"]
        assert lat["p20"] <= lat["value"] <= lat["p80"]
    for v in LOOP_VARIANTS:
        loop = by_key[v, "solver_loop_ms_per_step", None]
        assert 0 < loop["p20"] <= loop["value"] <= loop["p80"]
    for v, peer in [
        ("dpt_engine", "diffusers"),
        ("dpt_engine", "naive-original"),
        ("dpt_engine-fused", "diffusers"),
        ("dpt_engine-fused", "naive-original"),
        ("dpt_engine-fused", "dpt_engine"),
    ]:
        sp = by_key[v, "speedup", peer]
        assert sp["ratio"] == sp["value"] > 0
    for v in ("dpt_engine", "dpt_engine-fused", "diffusers"):
        assert (v, "outside_forward_fraction", "network-forward") in by_key
    assert by_key["dpt_engine", "setup_ms", None]["value"] > 0
    assert by_key["diffusers", "setup_ms", None]["value"] > 0

    # the engine and diffusers integrate the same ODE on the same grid: fp32-level agreement
    assert by_key["dpt_engine", "rel_diff", "diffusers"]["value"] < 1e-4
    assert by_key["dpt_engine", "rel_diff", "naive-original"]["value"] < 1e-4
    assert by_key["dpt_engine-fused", "rel_diff", "dpt_engine"]["value"] < 1e-5


def test_run_all_quick_writes_every_benchmark(tmp_path):
    """``run_all --quick`` runs each micro-benchmark and writes the combined JSON and markdown."""
    import json

    from benchmarks import run_all

    rc = run_all.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    (json_file,) = tmp_path.glob("all_*.json")
    assert (tmp_path / json_file.name.replace(".json", ".md")).is_file()
    data = json.loads(json_file.read_text())
    text = json.dumps(data)
    for name in ("attention", "ema", "solver_step", "sampler"):
        assert f'"{name}' in text, name


def test_scale_benchmark_small_run(tmp_path: Path) -> None:
    """bench_scale at 2,000 images: every metric present, the rerun generated nothing (it raises
    otherwise), the reader saw every image, the output folders are gone afterwards."""
    from benchmarks.bench_scale import main

    rows = main(["--classes", "20", "--per-class", "100", "--shard-size", "100", "--read-images", "500",
                 "--no-progress", "--out", str(tmp_path / "scratch"), "--json", str(tmp_path / "s.json"),
                 "--png", str(tmp_path / "s.png")])  # fmt: skip
    got = {(r["variant"], r["metric"]) for r in rows}
    for fmt in ("tar", "latents"):
        for metric in ("throughput", "pipeline_throughput", "peak_rss", "manifest_bytes", "manifest_rebuild",
                       "disk_bytes_per_image", "rerun", "reader_open", "read_throughput", "median_rss"):  # fmt: skip
            assert (fmt, metric) in got
    per_image = {r["variant"]: r["value"] for r in rows if r["metric"] == "disk_bytes_per_image"}
    assert per_image["latents"] > 4 * 8 * 8 * 4  # float32 4x8x8 latents, plus records
    assert json.loads((tmp_path / "s.json").read_text()) and (tmp_path / "s.png").stat().st_size > 0
    assert not list((tmp_path / "scratch").iterdir())

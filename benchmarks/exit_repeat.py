"""Clean exit of multi-process commands, shown by repetition: N x ``torchrun dpt sample`` or ``dpt stage2``.

A finished 2-process ``dpt sample`` once aborted at exit now and then ("terminate called without
an active exception", SIGABRT on rank 0, torchrun rc=1) although its output was complete: the
process group was never destroyed and writer threads could outlive it. A scheduler reads that as
a failed job. ``--command sample`` trains a 3-step digits generator once, then runs ``dpt
sample`` under ``torchrun --nproc_per_node=2`` (gloo) ``--runs`` times (batch 48, two background
writer threads, tar shards: the setting of the original failures), each with its own seed and
output folder. ``--command train`` runs ``dpt stage2 stage2.strategy=ddp`` (3 steps) the same
way, each in a fresh run folder: a process that built a ``DistributedDataParallel`` wrapper
keeps gloo's threads past ``destroy_process_group`` (torch), which aborted 1 CI run in ~30
(``dpt_engine.utils.dist.exit_process`` is the remedy). Per run: torchrun's exit status
(non-zero if any rank failed), whether stderr holds "terminate called" or a traceback, and how
many summaries were printed (one: rank 0's). Exit status 0 only if every run was clean.

Run: ``python -m benchmarks.exit_repeat [--command sample|train] [--runs 20] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dpt_engine.utils.dist import free_port
from dpt_engine.utils.io import atomic_write_json

from .harness import REPO_ROOT, commit_hash, device_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMMON = ["--no-progress", "stage2.label_source=true", "stage2.steps=3", "stage2.batch_size=8",
          "data.max_train=64", "run.threads=1"]  # fmt: skip
SAMPLE = ["sample.images_per_class=48", "sample.steps=2", "sample.batch_size=48", "sample.shard_size=40",
          "sample.writer_workers=2", "sample.format=tar", "sample.fid=false"]  # fmt: skip
TRAIN = ["stage2.strategy=ddp", "stage2.checkpoint_every=2"]
# --command -> (the dpt subcommand, its settings as recorded, the default results file)
MODES = {
    "sample": ("sample", SAMPLE, "exit_repeat_cpu.json"),
    "train": ("stage2", COMMON + TRAIN, "exit_repeat_train_cpu.json"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exit_repeat", description=__doc__.split("\n\n")[0])
    p.add_argument("--command", choices=tuple(MODES), default="sample")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="default: results/exit_repeat[_train]_cpu.json")
    return p


def _one(run_dir: Path, k: int, env: dict[str, str], command: str) -> dict[str, Any]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
              "-m", "dpt_engine.cli"]  # fmt: skip
    if command == "sample":
        cmd = [*launch, "sample", "--out", str(run_dir), *COMMON, *SAMPLE,
               f"sample.seed={k}", f"sample.output_dir={run_dir / f'samples_{k:02d}'}"]  # fmt: skip
    else:
        cmd = [*launch, "stage2", "--out", str(run_dir.parent / f"train_{k:02d}"), *COMMON, *TRAIN]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    return {
        "run": k,
        "returncode": proc.returncode,
        "terminate_called": "terminate called" in proc.stderr,
        "traceback": "Traceback" in proc.stderr,
        "summaries": proc.stdout.count(f"{MODES[command][0]}:"),
        "seconds": round(time.perf_counter() - t0, 2),
        "stderr_tail": proc.stderr[-800:] if proc.returncode else "",
    }


def _clean(r: dict[str, Any]) -> bool:
    """Exit 0 on every rank, no abort, no traceback, one summary (rank 0's)."""
    return r["returncode"] == 0 and not r["terminate_called"] and not r["traceback"] and r["summaries"] == 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    subcommand, settings, results_file = MODES[args.command]
    json_path = args.json or RESULTS_DIR / results_file
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dpt-exit-repeat-") as tmp:
        run_dir = Path(tmp) / "run"
        if args.command == "sample":
            train = [sys.executable, "-m", "dpt_engine.cli", "stage2", "--out", str(run_dir), *COMMON]
            subprocess.run(train, env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
        for k in range(args.runs):
            r = _one(run_dir, k, env, args.command)
            runs.append(r)
            print(f"run {k:2d}: rc {r['returncode']}, summaries {r['summaries']}, "
                  f"{'clean' if _clean(r) else 'NOT CLEAN'} ({r['seconds']} s)", flush=True)  # fmt: skip
    bad = [r["run"] for r in runs if not _clean(r)]
    doc = {
        "benchmark": "exit_repeat",
        "command": f"torchrun --nproc_per_node=2 -m dpt_engine.cli {subcommand} {' '.join(settings)}",
        "runs": len(runs),
        "clean": len(runs) - len(bad),
        "not_clean": bad,
        "device": device_name("cpu"),
        "commit": commit_hash(),
        "per_run": runs,
    }
    atomic_write_json(json_path, doc)
    print(f"exit_repeat: {doc['clean']} of {len(runs)} runs clean -> {json_path}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

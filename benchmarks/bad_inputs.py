"""Bad-input sweep: feed the ``dpt`` command line what users get wrong, and check how it answers.

Every case runs ``python -m dpt_engine.cli ...`` in its own process, as a user would, and must end
with

* a non-zero exit and one clear error line (``dpt...: error: ...``, what is wrong and how to fix
  it) and no Python traceback;
* no code run from a crafted file (every hostile pickle here would create a marker file);
* the finished run it was pointed at unchanged: every file byte-identical (the logs aside), no
  stage set aside (``<stage>.stale-*``), nothing added or removed.

The cases (more than 100) cover typos in overrides and config files, values out of range, paths
that do not exist or are of the wrong kind, hostile and damaged files (checkpoints, FID weights,
autoencoders, subset files, image folders, datasets), environment variables, commands run on a
fresh directory, unwritable places and the benchmark command.

    python -m benchmarks.bad_inputs                 # all cases (about 10 minutes on 2 cores)
    python -m benchmarks.bad_inputs --quick         # every 8th case
    python -m benchmarks.bad_inputs --json benchmarks/results/bad_inputs.json

Exit status 0 when every case passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# a finished run that the cases are pointed at: every stage of the digits preset, shrunk
FAST = [
    "stage1.steps=8", "stage1.batch_size=8", "stage1.uratio=2", "stage1.eval_every=8",
    "stage1.checkpoint_every=8", "stage2.steps=4", "stage2.batch_size=16", "stage2.log_every=2",
    "stage2.checkpoint_every=4", "sample.images_per_class=3", "sample.steps=3", "sample.fid=false",
    "stage3.steps=4", "stage3.batch_size=8", "stage3.uratio=2", "stage3.eval_every=4",
    "stage3.checkpoint_every=4", "run.threads=1",
]  # fmt: skip


@dataclass
class Case:
    name: str
    args: list[str]  # after `dpt`; "{FIN}" / "{FRESH}" / "{W}" are filled in
    env: dict[str, str] = field(default_factory=dict)
    prep: Callable[[Path], None] | None = None  # writes the case's files under the workspace


class _Hostile:
    """Unpickling this creates the marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_files(w: Path) -> None:
    import torch

    marker = str(w / "PWNED")
    (w / "evil.pkl").write_bytes(pickle.dumps({"weights": _Hostile(marker)}, protocol=4))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Hostile(marker)}, w / "evil.pt")
    torch.save({"w": torch.zeros(2)}, w / "tiny.pt")  # harmless but not what is wanted
    good = w / "good.pt"
    torch.save({"pos_embed": torch.zeros(1, 6, 8)}, good)
    (w / "trunc.pt").write_bytes(good.read_bytes()[:200])
    (w / "empty.pt").write_bytes(b"")
    (w / "garbage.pt").write_bytes(b"GIF89a not a checkpoint" * 20)
    (w / "text.safetensors").write_text("hello")
    (w / "not_utf8.yaml").write_bytes(b"\xff\xfe\x00\x01bad")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "bad.yaml").write_text("stage1: {steps: [1, 2\n")
    (w / "unknown_key.yaml").write_text("stage1:\n  stepz: 3\n")
    (w / "bad_value.yaml").write_text("stage2:\n  lr: fast\n")
    (w / "subset_garbage.txt").write_text("this is not an index list\n\x00\x01")
    (w / "subset_range.txt").write_text("0\n5\n999999\n")
    (w / "subset_empty.txt").write_text("")
    (w / "afile").write_text("x")
    (w / "emptydir").mkdir()
    (w / "pseudo_flat").mkdir()
    (w / "pseudo_flat" / "img.png").write_bytes(b"\x89PNG")
    (w / "pseudo_wrongclass" / "zebra").mkdir(parents=True)
    (w / "pseudo_junk" / "0").mkdir(parents=True)
    for i in range(3):
        (w / "pseudo_junk" / "0" / f"{i}.png").write_bytes(b"not a png")
    fm = w / "fmnist_bad"
    fm.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (fm / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 10)
    _image_trees(w)


def _image_trees(w: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def tree(root: Path, n: int, size=(16, 16), damage: int = 0, val: bool = True) -> None:
        for split, m in (("train", n), ("val", 3)):
            if split == "val" and not val:
                continue
            for c in ("cat", "dog"):
                d = root / split / c
                d.mkdir(parents=True, exist_ok=True)
                for j in range(m):
                    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                        d / f"{j}.png"
                    )
        for j in range(damage):
            (root / "train" / "cat" / f"{j}.png").write_bytes(b"")

    tree(w / "folder_damaged", 20, damage=5)
    tree(w / "folder_noval", 10, val=False)
    tree(w / "folder_nonsquare", 10, size=(16, 12))
    (w / "folder_empty" / "train" / "cat").mkdir(parents=True)
    (w / "folder_empty" / "val" / "cat").mkdir(parents=True)


def cases() -> list[Case]:
    C = Case
    fin = ["--preset", "digits", "--out", "{FIN}", "--no-progress", *FAST]
    fresh = ["--preset", "digits", "--out", "{FRESH}", "--no-progress", *FAST]
    out: list[Case] = []
    # -- overrides: syntax and unknown keys
    for o in [
        "stage1.steps", "=3", "stage1.stepz=3", "stage9.steps=3", "stage1.steps.x=3", "data=3",
        "stage1=5", "run.device.x=cpu", "nosuch=1", "stage2.modle=unet-tiny28",
    ]:  # fmt: skip
        out.append(C(f"override {o!r}", ["run", *fin, o]))
    # -- values: types, ranges, registry names
    for o in [
        "stage1.steps=abc", "stage1.steps=-5", "stage1.steps=0", "stage1.steps=1.5", "stage1.batch_size=0",
        "stage1.lr=-1", "stage1.lr=0", "stage1.threshold=1.5", "stage1.momentum=2", "stage1.tau_ema=-0.1",
        "stage1.learner=nosuch", "stage1.backbone=nosuch", "stage1.backbone=timm:nosuchnet",
        "stage1.backbone=msn:nosuch", "stage1.uratio=0", "stage1.weight_decay=-1", "stage1.precision=fp8",
        "stage2.model=nosuch", "stage2.lr=-1", "stage2.steps=0", "stage2.batch_size=-1",
        "stage2.ema_decay=1.5", "stage2.beta1=1", "stage2.schedule=cosine", "stage2.grad_accum=0",
        "stage2.batch_size=10 stage2.grad_accum=3", "stage2.zero_stage=7", "stage2.strategy=nosuch",
        "stage2.precision=int8", "stage2.label_dropout=1.0", "stage2.min_snr_gamma=0", "stage2.warmup_steps=-1",
        "stage2.grad_clip=0", "stage2.label_source=nosuch", "stage2.offload_optimizer=true",
        "sample.steps=0", "sample.images_per_class=0", "sample.guidance_scale=abc", "sample.order=9",
        "sample.method=nosuch", "sample.skip_type=nosuch", "sample.format=nosuch", "sample.batch_size=0",
        "stage3.lr=-1", "stage3.steps=0", "stage3.pseudo_weighting=nosuch", "stage3.backbone=nosuch",
        "data.labels_per_class=0", "data.labels_per_class=-1", "data.label_fraction=2",
        "data.labels_per_class=null", "data.name=nosuch", "data.image_size=2", "data.max_train=0",
        "data.holdout=0", "data.max_unreadable=2", "run.threads=-2", "run.threads=0", "run.num_workers=-1",
        "run.device=tpu", "run.device=cuda", "run.device=cuda:7", "data.labels_per_class=100000",
    ]:  # fmt: skip
        out.append(C(f"value {o!r}", ["run", *fin, *o.split(" ")]))
    # -- presets and config files
    out += [
        C("unknown preset", ["run", "--preset", "nosuch", "--out", "{FRESH}"]),
        C("config file missing", ["run", *fin, "--config", "{W}/nope.yaml"]),
        C("config file not UTF-8", ["run", *fin, "--config", "{W}/not_utf8.yaml"]),
        C("config file is a list", ["run", *fin, "--config", "{W}/list.yaml"]),
        C("config file bad YAML", ["run", *fin, "--config", "{W}/bad.yaml"]),
        C("config file unknown key", ["run", *fin, "--config", "{W}/unknown_key.yaml"]),
        C("config file bad value", ["run", *fin, "--config", "{W}/bad_value.yaml"]),
        C("config file is a directory", ["run", *fin, "--config", "{W}/emptydir"]),
        C("unknown option", ["run", *fin, "--bogus"]),
        C("unknown command", ["frobnicate"]),
    ]
    # -- paths
    out += [
        C("--out is a file", ["run", "--preset", "digits", "--out", "{W}/afile", *FAST]),
        C("--out below a file", ["run", "--preset", "digits", "--out", "{W}/afile/run", *FAST]),
        C("--out unwritable", ["run", "--preset", "digits", "--out", "/proc/dpt-run", *FAST]),
        C("data.root missing", ["run", *fin, "data.name=fashion-mnist", "data.root={W}/nope"]),
        C(
            "data.root damaged idx files",
            ["run", *fin, "data.name=fashion-mnist", "data.root={W}/fmnist_bad"],
        ),
        C("imagefolder without root", ["run", *fin, "data.name=imagefolder", "data.labels_per_class=1"]),
        C(
            "imagefolder damaged (5 of 40)",
            ["run", *fin, "data.name=imagefolder", "data.root={W}/folder_damaged", "data.labels_per_class=1"],
        ),
        C(
            "imagefolder without val/",
            ["run", *fin, "data.name=imagefolder", "data.root={W}/folder_noval", "data.labels_per_class=1"],
        ),
        C(
            "imagefolder not square",
            [
                "run",
                *fin,
                "data.name=imagefolder",
                "data.root={W}/folder_nonsquare",
                "data.labels_per_class=1",
            ],
        ),
        C(
            "imagefolder empty",
            ["run", *fin, "data.name=imagefolder", "data.root={W}/folder_empty", "data.labels_per_class=1"],
        ),
        C("cifar10 without root", ["run", *fin, "data.name=cifar10"]),
        C(
            "subset file missing",
            ["run", *fin, "data.labels_per_class=null", "data.subset_file={W}/nope.txt"],
        ),
        C(
            "subset file garbage",
            ["run", *fin, "data.labels_per_class=null", "data.subset_file={W}/subset_garbage.txt"],
        ),
        C(
            "subset file out of range",
            ["run", *fin, "data.labels_per_class=null", "data.subset_file={W}/subset_range.txt"],
        ),
        C(
            "subset file empty",
            ["run", *fin, "data.labels_per_class=null", "data.subset_file={W}/subset_empty.txt"],
        ),
        C("two label selections", ["run", *fin, "data.label_fraction=0.1"]),
        C("autoencoder missing", ["run", *fin, "stage2.autoencoder={W}/nope.pth"]),
        C("autoencoder hostile pickle", ["run", *fin, "stage2.autoencoder={W}/evil.pt"]),
        C("autoencoder garbage", ["run", *fin, "stage2.autoencoder={W}/garbage.pt"]),
        C("autoencoder wrong weights", ["run", *fin, "stage2.autoencoder={W}/tiny.pt"]),
        C("autoencoder is a directory", ["run", *fin, "stage2.autoencoder={W}/emptydir"]),
        C(
            "probe checkpoint missing",
            ["run", *fin, "stage1.learner=linear-probe", "stage1.probe_checkpoint={W}/nope.pth"],
        ),
        C(
            "probe checkpoint hostile",
            [
                "run",
                *fin,
                "stage1.learner=linear-probe",
                "stage1.backbone=msn:vit_small_patch16",
                "data.image_size=16",
                "stage1.probe_checkpoint={W}/evil.pt",
            ],
        ),
        C("pseudo_dir missing", ["stage3", *fin, "stage3.pseudo_dir={W}/nope"]),
        C("pseudo_dir empty", ["stage3", *fin, "stage3.pseudo_dir={W}/emptydir"]),
        C("pseudo_dir flat files", ["stage3", *fin, "stage3.pseudo_dir={W}/pseudo_flat"]),
        C("pseudo_dir unknown class", ["stage3", *fin, "stage3.pseudo_dir={W}/pseudo_wrongclass"]),
        C("pseudo_dir unreadable images", ["stage3", *fin, "stage3.pseudo_dir={W}/pseudo_junk"]),
    ]
    # -- checkpoints and FID weights given to a finished run
    for f in (
        "nope.pth",
        "evil.pt",
        "evil.pkl",
        "trunc.pt",
        "empty.pt",
        "garbage.pt",
        "tiny.pt",
        "text.safetensors",
        "emptydir",
    ):
        out.append(C(f"sample --checkpoint {f}", ["sample", *fin, "--checkpoint", f"{{W}}/{f}"]))
    for f in ("nope.pt", "evil.pt", "evil.pkl", "trunc.pt", "garbage.pt", "tiny.pt"):
        out.append(
            C(
                f"sample.fid_weights={f}",
                [
                    "sample",
                    *fin,
                    "sample.fid=true",
                    "sample.fid_num_images=8",
                    f"sample.fid_weights={{W}}/{f}",
                ],
            )
        )
    out.append(
        C(
            "DPT_FID_WEIGHTS hostile",
            ["sample", *fin, "sample.fid=true", "sample.fid_num_images=8"],
            env={"DPT_FID_WEIGHTS": "{W}/evil.pt"},
        )
    )
    out.append(
        C(
            "DPT_FID_WEIGHTS missing",
            ["sample", *fin, "sample.fid=true", "sample.fid_num_images=8"],
            env={"DPT_FID_WEIGHTS": "{W}/nope.pt"},
        )
    )
    # -- environment
    out += [
        C("DPT_KERNELS bogus", ["run", *fin], env={"DPT_KERNELS": "bogus"}),
        C("DPT_KERNELS triton without interpreter", ["run", *fin], env={"DPT_KERNELS": "triton"}),
        C("DPT_KERNELS cuda on a CPU", ["run", *fin], env={"DPT_KERNELS": "ema=cuda"}),
        C("DPT_KERNELS bad syntax", ["run", *fin], env={"DPT_KERNELS": "ema=,,=x"}),
        C(
            "DPT_IMAGE_DECODER bogus",
            [
                "run",
                *fin,
                "data.name=imagefolder",
                "data.root={W}/folder_damaged",
                "data.labels_per_class=1",
                "data.max_unreadable=0.5",
            ],
            env={"DPT_IMAGE_DECODER": "bogus"},
        ),
    ]
    # -- commands on a fresh directory (the upstream stage is missing)
    out += [
        C("sample on a fresh directory", ["sample", *fresh]),
        C("stage2 on a fresh directory", ["stage2", *fresh]),
        C("stage3 on a fresh directory", ["stage3", *fresh]),
    ]
    # -- the benchmark command
    out += [
        C("bench --json unwritable", ["bench", "train", "--json", "/proc/dpt/x.json"]),
        C("bench --json below a file", ["bench", "train", "--json", "{W}/afile/x.json"]),
        C("bench --device tpu", ["bench", "train", "--device", "tpu"]),
        C("bench --model nosuch", ["bench", "train", "--model", "nosuch"]),
        C("bench --batch 0", ["bench", "train", "--batch", "0"]),
        C("bench --steps -1", ["bench", "train", "--steps", "-1"]),
        C("bench unknown section", ["bench", "nosuch"]),
    ]
    return out


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the logs (appended to by design)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("log"):
            snap[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _fill(s: str, subs: dict[str, str]) -> str:
    for k, v in subs.items():
        s = s.replace("{" + k + "}", v)
    return s


def _error_line(stderr: str) -> str | None:
    """The one line that tells the user what went wrong, if there is exactly one."""
    lines = [
        ln
        for ln in stderr.splitlines()
        if (ln.startswith("dpt") and ": error:" in ln) or ln.startswith("dpt bench: ")
    ]
    return lines[-1] if len(lines) == 1 else None


def run_case(case: Case, w: Path, fin: Path, i: int, timeout: float = 600.0) -> dict[str, Any]:
    fresh = w / f"fresh{i}"
    subs = {"W": str(w), "FIN": str(fin), "FRESH": str(fresh)}
    args = [_fill(a, subs) for a in case.args]
    env = {**os.environ, **{k: _fill(v, subs) for k, v in case.env.items()}}
    env.pop("TRITON_INTERPRET", None)
    before = _snapshot(fin)
    stale_before = sorted(fin.glob("*.stale-*"))
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "dpt_engine.cli", *args], capture_output=True, text=True, env=env,
        timeout=timeout, cwd=str(w),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = _snapshot(fin)
    stale = sorted(fin.glob("*.stale-*")) != stale_before
    line = _error_line(p.stderr)
    rec = {
        "name": case.name,
        "command": "dpt " + " ".join(a for a in args if a not in FAST),
        "env": {k: _fill(v, subs) for k, v in case.env.items()},
        "rc": p.returncode,
        "traceback": "Traceback (most recent call last)" in p.stderr,
        "code_ran": (w / "PWNED").exists(),
        "artifacts_changed": before != after or stale,
        "error_line": line,
        "seconds": round(wall, 1),
    }
    rec["ok"] = (
        p.returncode != 0 and not rec["traceback"] and not rec["code_ran"] and not rec["artifacts_changed"]
        and line is not None
    )  # fmt: skip
    if not rec["ok"]:
        rec["stderr_tail"] = p.stderr[-1500:]
    if rec["code_ran"]:
        (w / "PWNED").unlink()
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every 8th case")
    ap.add_argument("--only", default=None, help="cases whose name contains this text")
    ap.add_argument("--json", default=None, help="write the per-case results here")
    ap.add_argument("--workdir", default=None, help="keep the workspace here (default: a temporary one)")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    all_cases = cases()
    names = [c.name for c in all_cases]
    assert len(set(names)) == len(names), "case names must be distinct"
    chosen = all_cases[::8] if args.quick else all_cases
    if args.only:
        chosen = [c for c in chosen if args.only in c.name]
    with tempfile.TemporaryDirectory(prefix="dpt-bad-inputs-") as tmp:
        w = Path(args.workdir or tmp).resolve()
        w.mkdir(parents=True, exist_ok=True)
        _hostile_files(w)
        fin = w / "finished"
        subprocess.run(
            [sys.executable, "-m", "dpt_engine.cli", "run", "--preset", "digits", "--out", str(fin), "--no-progress", *FAST],
            check=True, capture_output=True, cwd=str(w),
        )  # fmt: skip
        results = []
        for i, case in enumerate(tqdm(chosen, desc="bad inputs", unit="case")):
            results.append(run_case(case, w, fin, i))
            if not results[-1]["ok"]:
                r = results[-1]
                tqdm.write(f"FAIL {case.name}: rc={r['rc']} traceback={r['traceback']} code_ran={r['code_ran']} "
                           f"artifacts_changed={r['artifacts_changed']}\n{r.get('stderr_tail', '')[-600:]}")  # fmt: skip
    summary = {
        "cases": len(results),
        "passed": sum(r["ok"] for r in results),
        "tracebacks": sum(r["traceback"] for r in results),
        "code_executed": sum(r["code_ran"] for r in results),
        "artifacts_changed": sum(r["artifacts_changed"] for r in results),
        "no_clear_error_line": sum(r["error_line"] is None for r in results),
        "exit_zero": sum(r["rc"] == 0 for r in results),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        from dpt_engine.utils.io import atomic_write_json

        atomic_write_json(args.json, {"summary": summary, "cases": results})
    return 0 if summary["passed"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())

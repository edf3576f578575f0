"""DPT in the paper's ImageNet regime, in miniature: the classifier is a linear probe on a frozen
self-supervised backbone, as DPT's stage 1 and stage 3 are on ImageNet (MSN features + logistic
regression), instead of the preset's FreeMatch, which already self-trains on the unlabeled images.

For each label seed, on a held-out part of the training set (``data.holdout``; the test split is
never read):

1. a SimCLR pretraining of the preset's classifier backbone on the training images, labels unused
   (two RandAugment views per image, NT-Xent loss, AdamW, cosine schedule), saved as a backbone
   checkpoint; one per seed, since the held-out images depend on the seed;
2. the preset's pipeline with ``stage1.learner=linear-probe`` and ``stage3.learner=linear-probe`` on
   that checkpoint: the probe on the labeled images pseudo-labels the training set, stage 2 trains
   the preset's generator on those pseudo-labels, sampling draws the pseudo images, and stage 3 fits
   the probe on the labeled + pseudo images (DPT's stage 3: pseudo images drawn like labeled ones,
   from scratch). The probe is deterministic, so stage 1 is also stage 3 without pseudo images.

The table sets this next to the preset's own FreeMatch stage 1 and stage 3 on the same held-out
images where ``stage3_sweep`` has recorded them (``stage3_sweep_<preset>.json``, same holdout).

    python -m benchmarks.quality.probe_regime --preset fashion-mnist --holdout 5000 --seeds 0 \\
        --out runs/probe_regime_fashion

Every step resumes (the pretraining from its last checkpoint, the pipeline stage by stage), and a
later call keeps the seeds earlier calls recorded. Results: ``<results>/probe_regime_<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

__all__ = ["main", "nt_xent", "pretrain_simclr"]


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for ``z`` of shape ``(2B, D)``, rows ``i`` and ``i + B`` two views of one image:
    cross-entropy of each row's cosine similarities (over the other ``2B - 1`` rows) against its twin."""
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"nt_xent needs an even number of rows (two views per image), got {n}")
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    b = n // 2
    twin = torch.cat([torch.arange(b, n), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, twin)


def pretrain_simclr(
    images: Any,
    backbone: str,
    num_classes: int,
    out: Path,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    hflip: bool = False,
    bf16: bool = True,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    checkpoint_every: int = 250,
    progress: bool = True,
) -> dict[str, Any]:
    """SimCLR on ``images`` (an ``ImageDataset``; labels unused); writes ``out/backbone.pt`` (the
    classifier's state dict, head untrained: the probe never uses it) and returns its record.
    ``out/simclr_state.pt`` holds the run's state every ``checkpoint_every`` steps, so a stopped
    pretraining resumes where it stopped; a finished one with the same settings is not redone."""
    from tqdm import tqdm

    from dpt_engine.models.classifiers import create_classifier
    from dpt_engine.ssl.augment import strong
    from dpt_engine.utils.io import atomic_torch_save, atomic_write_json, read_json

    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "backbone": backbone, "steps": steps, "batch_size": batch_size, "lr": lr,
        "temperature": temperature, "hflip": hflip, "bf16": bf16, "seed": seed, "num_images": len(images),
    }  # fmt: skip
    done = out / "simclr.json"
    if done.is_file() and (out / "backbone.pt").is_file():
        rec = read_json(done)
        if rec.get("settings") == settings:
            return rec
    torch.manual_seed(seed)
    net = create_classifier(backbone, num_classes, images.channels, images.image_size).to(device)
    with torch.no_grad():
        width = net.forward_features(torch.zeros(2, images.channels, images.image_size, images.image_size,
                                                 device=device)).shape[1]  # fmt: skip
    proj = nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128)).to(device)
    opt = torch.optim.AdamW([*net.parameters(), *proj.parameters()], lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    start, elapsed, losses = 0, 0.0, []
    state_path = out / "simclr_state.pt"
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["settings"] == settings:
            net.load_state_dict(st["net"])
            proj.load_state_dict(st["proj"])
            opt.load_state_dict(st["opt"])
            gen.set_state(st["gen"])
            start, elapsed, losses = int(st["step"]), float(st["elapsed"]), list(st["losses"])
    warmup = max(1, min(100, steps // 10))
    all_images = len(images)
    net.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc="simclr", initial=start, total=steps, disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(all_images, (batch_size,), generator=gen)
        x = images.get_batch(idx).float().div_(255)
        views = torch.cat([strong(x, gen, hflip=hflip), strong(x, gen, hflip=hflip)]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            z = proj(net.forward_features(views))
        loss = nt_xent(z, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            atomic_torch_save(state_path, {
                "settings": settings, "net": net.state_dict(), "proj": proj.state_dict(), "opt": opt.state_dict(),
                "gen": gen.get_state(), "step": step + 1, "elapsed": elapsed + time.perf_counter() - t0,
                "losses": losses,
            })  # fmt: skip
    atomic_torch_save(out / "backbone.pt", {k: v.cpu() for k, v in net.state_dict().items()})
    rec = {
        "settings": settings,
        "wall_time_s": elapsed + time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "loss_first": losses[0] if losses else None,
        "loss_last": statistics.fmean(losses[-50:]) if losses else None,
    }
    atomic_write_json(done, rec)
    state_path.unlink(missing_ok=True)
    return rec


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"# DPT with a linear probe on self-supervised features: preset `{res['preset']}`",
        "",
        f"{res['holdout']} class-balanced training images held out of every stage (labels unseen) are the "
        f"evaluation split; the test split is not used. Commit {res['commit']}, {res['device']}. Backbone "
        f"`{res['backbone']}` pretrained with SimCLR ({res['ssl']['steps']} steps, batch {res['ssl']['batch_size']}) "
        "on the training images; stage 1 and stage 3 are linear probes on its frozen features; stage 2 and "
        "sampling are the preset's. FreeMatch columns: the preset as shipped on the same held-out images "
        "(`stage3_sweep`), where recorded.",
        "",
        "| seed | probe stage 1 (%) | its pseudo-labels (%) | FID | probe stage 3 (%) | gain (95% interval) | "
        "FreeMatch stage 1 (%) | FreeMatch stage 3 (%) | wall time (min): SimCLR + stages |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    gains = []
    for s in res["seeds"]:
        r = res["runs"].get(str(s))
        if r is None:
            continue
        ci = r.get("ci95") or (None, None)
        gains.append(r["gain"])
        wall = (r["ssl_wall_time_s"] + sum(r["wall_time_s"].values())) / 60
        lines.append(
            f"| {s} | {r['stage1']:.2f} | {_fmt(r.get('pseudo_label_accuracy'))} | {_fmt(r.get('fid'))} | {r['stage3']:.2f} "
            f"| {r['gain']:+.2f} ({_fmt(ci[0], '+.2f')}..{_fmt(ci[1], '+.2f')}) "
            f"| {_fmt(r.get('freematch_stage1'))} | {_fmt(r.get('freematch_stage3'))} | {wall:.1f} |"
        )
    if gains:
        sd = f" +- {statistics.stdev(gains):.2f}" if len(gains) > 1 else ""
        lines += [
            "",
            f"Mean gain of the probe's stage 3 over its stage 1: {statistics.fmean(gains):+.2f}{sd} points (n = {len(gains)}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument(
        "--holdout", type=int, default=5000, help="training images held out as the evaluation split"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="label seeds")
    p.add_argument("--ssl-steps", type=int, default=2000)
    p.add_argument("--ssl-batch", type=int, default=256)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    p.add_argument("--out", default="runs/probe_regime")
    p.add_argument("--results", default=str(RESULTS_DIR))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from dpt_engine.cli import set_process_defaults

    set_process_defaults()
    from dpt_engine.config.presets import resolve_config
    from dpt_engine.data import build_splits
    from dpt_engine.pipeline import run_pipeline
    from dpt_engine.utils.io import atomic_write_json, atomic_write_text, read_json

    from ..harness import commit_hash, device_name

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out).resolve()
    stem = f"probe_regime_{args.preset}"
    results = Path(args.results)
    res: dict[str, Any] = {
        "preset": args.preset,
        "holdout": args.holdout,
        "seeds": list(args.seeds),
        "commit": commit_hash(),
        "device": device_name(device.type),
        "command": " ".join(
            ["python -m benchmarks.quality.probe_regime", *(argv if argv is not None else sys.argv[1:])]
        ),
        "set": list(args.set),
        "ssl": {"method": "simclr", "steps": args.ssl_steps, "batch_size": args.ssl_batch},
        "runs": {},
    }
    old_path = results / f"{stem}.json"
    if old_path.is_file():
        old = read_json(old_path)
        if (old.get("holdout"), old.get("set"), old.get("ssl")) == (args.holdout, res["set"], res["ssl"]):
            res["runs"] = {k: v for k, v in old.get("runs", {}).items() if int(k) not in args.seeds}
            res["seeds"] = sorted({*old.get("seeds", []), *args.seeds})
    sweep_path = results / f"stage3_sweep_{args.preset}.json"
    sweep = read_json(sweep_path) if sweep_path.is_file() else {}
    if sweep.get("holdout") != args.holdout or sweep.get("set"):
        sweep = {}
    for s in args.seeds:
        common = [f"data.holdout={args.holdout}", f"data.seed={s}", f"run.seed={s}", *args.set]
        cfg = resolve_config(args.preset, overrides=common)
        res["backbone"] = cfg.stage1.backbone
        sp = build_splits(cfg.data)
        print(
            f"[probe] seed {s}: SimCLR pretraining of {cfg.stage1.backbone} on {len(sp.train)} images",
            flush=True,
        )
        ssl = pretrain_simclr(
            sp.train, cfg.stage1.backbone, sp.num_classes, out / f"s{s}_ssl",
            steps=args.ssl_steps, batch_size=args.ssl_batch, hflip=cfg.stage1.hflip,
            bf16=cfg.stage1.precision == "bf16" or (cfg.stage1.precision == "auto" and device.type == "cuda"),
            seed=s, device=device, progress=not args.no_progress,
        )  # fmt: skip
        ckpt = str(out / f"s{s}_ssl" / "backbone.pt")
        probe = [
            "stage1.learner=linear-probe", f"stage1.probe_checkpoint={ckpt}",
            "stage3.learner=linear-probe", f"stage3.probe_checkpoint={ckpt}",
            "stage3.init_from_stage1=false", "stage3.pseudo_weighting=uniform",
        ]  # fmt: skip
        print(f"[probe] seed {s}: stage 1, stage 2, sampling, stage 3", flush=True)
        rep = run_pipeline(
            resolve_config(args.preset, overrides=[*common, *probe]),
            out / f"s{s}_dpt",
            stages=["stage1", "stage2", "sample", "stage3"],
            progress=not args.no_progress,
        )
        st3 = rep["stage3"]
        fm3 = (sweep.get("candidates", {}).get("preset", {}).get(str(s)) or {}).get("top1")
        res["runs"][str(s)] = {
            "stage1": rep["stage1"]["top1"],
            "stage3": st3["top1"],
            "gain": st3["gain"],
            "ci95": (st3.get("gain_stats") or {}).get("ci95"),
            "fid": (rep.get("generation") or {}).get("fid"),
            "pseudo_label_accuracy": (rep.get("pseudo_labels") or {}).get("accuracy"),
            "freematch_stage1": sweep.get("stage1", {}).get(str(s)),
            "freematch_stage3": fm3,
            "ssl_wall_time_s": ssl["wall_time_s"],
            "ssl_threads": ssl["threads"],
            "wall_time_s": rep.get("wall_time_s", {}),
            "overrides": probe,
            "commit": res["commit"],
        }
        atomic_write_json(results / f"{stem}.json", res)
        atomic_write_text(results / f"{stem}.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

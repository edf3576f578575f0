"""Stage bookkeeping shared by every stage: run directories, fingerprints, skip/resume.

A stage's directory holds ``fingerprint.json`` (written when the stage starts) and
``done.json`` (written atomically when it finishes, last). ``dpt run`` skips a stage whose
``done.json`` carries the fingerprint of the current config; a stage started under another
config is moved aside to ``<stage>.stale-<fingerprint>`` (never deleted) before it restarts.
Inside a stage, training writes checkpoints so a killed run resumes where it stopped.

Under ``torchrun`` every rank calls the same stage functions; ``run_stage`` keeps the
bookkeeping on rank 0 (see its docstring).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..config.schema import PipelineConfig
from ..utils.dist import barrier, broadcast_object, dist_info
from ..utils.io import atomic_write_json, atomic_write_text, read_json, stable_hash

log = logging.getLogger("dpt_engine")

__all__ = [
    "StageContext",
    "StageResult",
    "data_fingerprint",
    "environment_info",
    "resolve_device",
    "run_stage",
    "stage_done",
    "upstream_fingerprint",
]


@dataclass
class StageContext:
    cfg: PipelineConfig
    out: Path
    device: torch.device
    progress: bool = True

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def write_config(self) -> None:
        """``config.yaml``: the resolved config of the run directory's current work. Written when a
        stage is about to run (after its inputs were checked, so a typo leaves the old one) and with
        the report; not rewritten when unchanged (a rerun on a full disk gets as far as it can)."""
        if not dist_info().is_main:
            return
        import yaml

        from ..config.base import to_dict

        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        path = self.out / "config.yaml"
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except (OSError, UnicodeError):
            pass
        atomic_write_text(path, text)


@dataclass
class StageResult:
    name: str
    summary: dict[str, Any]
    skipped: bool
    wall_time_s: float
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..config.base import ConfigError

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"run.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec} but no CUDA GPU is available; use run.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"run.device={spec} but this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..cuda:N-1"
        )
    return dev


def data_fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    """The data config as stage fingerprints see it; a field added later is left out while unset,
    so runs made before it existed stay up to date."""
    from ..config.base import to_dict

    d = to_dict(cfg.data)
    if d.get("holdout") is None:
        d.pop("holdout", None)
    d.pop("max_unreadable", None)  # decides whether to stop, not what is computed
    return d


def stage_done(stage_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    done = stage_dir / "done.json"
    if not done.is_file():
        return None
    try:
        record = read_json(done)
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


def _restore_set_aside(stage_dir: Path, fingerprint: str) -> Optional[Path]:
    """Bring back ``<stage>.stale-<fingerprint>`` (work done under this very config, moved aside
    when the config changed) unless the current directory already holds this config's work."""
    stale = stage_dir.with_name(f"{stage_dir.name}.stale-{fingerprint}")
    if not stale.is_dir():
        return None
    fp_file = stage_dir / "fingerprint.json"
    if fp_file.is_file():
        try:
            if read_json(fp_file).get("fingerprint") == fingerprint:
                return None  # the current directory is this config's (maybe interrupted) run: keep it
        except (OSError, ValueError):
            pass
    _set_aside(stage_dir, fingerprint)  # whatever is there now is kept too
    if stage_dir.exists() and not any(stage_dir.iterdir()):
        stage_dir.rmdir()
    if stage_dir.exists():
        return None  # could not move it out of the way: leave both alone, recompute
    os.replace(stale, stage_dir)
    return stale


def _set_aside(stage_dir: Path, fingerprint: str) -> None:
    """Move a stage directory started under another config out of the way (kept, not deleted)."""
    fp_file = stage_dir / "fingerprint.json"
    if not stage_dir.exists():
        return
    old = read_json(fp_file).get("fingerprint", "unknown") if fp_file.is_file() else "unknown"
    if old == fingerprint:
        return
    if not any(stage_dir.iterdir()):
        return
    target = stage_dir.with_name(f"{stage_dir.name}.stale-{old}")
    n = 1
    while target.exists():
        target = stage_dir.with_name(f"{stage_dir.name}.stale-{old}-{n}")
        n += 1
    log.warning(
        "%s: config changed since it was started; moving the old artifacts to %s", stage_dir.name, target
    )
    os.replace(stage_dir, target)


# the start of the stage's current call and the useful time of its earlier, interrupted calls
_ATTEMPT_FILE = "attempt.json"


def _start_attempt(stage_dir: Path) -> float:
    """Record that a call of the stage starts now; return the seconds earlier calls spent on it.

    An earlier call that never finished counts from its start to the newest file it left in the
    stage directory (its last checkpoint or shard: what it did after that is redone now), so a
    stage resumed over several sittings reports its whole cost, not only the last sitting's."""
    path = stage_dir / _ATTEMPT_FILE
    earlier = 0.0
    try:
        rec = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        rec = {}
    if "started" in rec:
        earlier = float(rec.get("earlier_s", 0.0))
        started = float(rec["started"])
        newest = max(
            (p.stat().st_mtime for p in stage_dir.rglob("*") if p.is_file() and p.name != _ATTEMPT_FILE),
            default=started,
        )
        earlier += max(0.0, newest - started)
    atomic_write_json(path, {"started": time.time(), "earlier_s": earlier})
    return earlier


def run_stage(
    ctx: StageContext,
    name: str,
    fingerprint_inputs: dict[str, Any],
    body: Callable[[Path], dict[str, Any]],
    distributed: bool = False,
    precheck: Optional[Callable[[], None]] = None,
) -> StageResult:
    """Run ``body(stage_dir) -> summary`` unless a finished run with the same inputs exists.

    Rank-aware under a multi-process launcher (``torchrun``): rank 0 alone decides whether the
    stage is up to date, sets an old directory aside and writes ``fingerprint.json`` and
    ``done.json``; the other ranks wait (at barriers, or for ``done.json``) and get rank 0's summary. A ``distributed``
    body runs on every rank (it splits the work itself, e.g. the stage-2 trainer); otherwise only
    rank 0 runs it. In a world of one this is the plain single-process flow.

    ``precheck`` validates the stage's external inputs (a checkpoint, an autoencoder, a folder of
    images) and raises on bad ones; it runs before anything in the run directory is touched, so a
    typo never sets finished work aside. A directory set aside earlier for exactly this config
    (``<stage>.stale-<fingerprint>``) is moved back instead of recomputed.
    """
    fingerprint = stable_hash(fingerprint_inputs)
    stage_dir = ctx.stage_dir(name)
    main = dist_info().is_main
    record = stage_done(stage_dir, fingerprint) if main else None
    if main and record is None:
        if precheck is not None:
            precheck()
        restored = _restore_set_aside(stage_dir, fingerprint)
        if restored is not None:
            log.info("%s: restored %s (set aside earlier for this same config)", name, restored.name)
            record = stage_done(stage_dir, fingerprint)
    record = broadcast_object(record)
    if record is not None:
        log.info("%s: up to date (fingerprint %s), skipping", name, fingerprint)
        return StageResult(name, record["summary"], True, float(record.get("wall_time_s", 0.0)), fingerprint)
    earlier = 0.0
    if main:
        ctx.write_config()
        _set_aside(stage_dir, fingerprint)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "done.json").unlink(missing_ok=True)
        earlier = _start_attempt(stage_dir)
        atomic_write_json(
            stage_dir / "fingerprint.json", {"fingerprint": fingerprint, "inputs": fingerprint_inputs}
        )
        log.info("%s: running in %s", name, stage_dir)
    barrier()
    t0 = time.perf_counter()
    if main or distributed:
        summary = body(stage_dir)
    else:
        # Wait by watching the file system rather than in a collective: rank 0's body may run far
        # longer than the process group's timeout (if rank 0 fails, the launcher stops this rank).
        # This also works before any process group exists (e.g. stage 1 of `torchrun ... dpt run`).
        while (record := stage_done(stage_dir, fingerprint)) is None:
            time.sleep(2.0)
        summary = record["summary"]
    this_call = time.perf_counter() - t0
    wall = this_call + earlier
    if main:
        atomic_write_json(
            stage_dir / "done.json",
            {
                "fingerprint": fingerprint,
                "wall_time_s": wall,
                "wall_time_this_call_s": this_call,
                "wall_time_earlier_calls_s": earlier,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "summary": summary,
            },
        )
        (stage_dir / _ATTEMPT_FILE).unlink(missing_ok=True)
        if earlier:
            log.info(
                "%s: done in %.1f s (%.1f s in this call, %.1f s in earlier interrupted ones)",
                name,
                wall,
                this_call,
                earlier,
            )
        else:
            log.info("%s: done in %.1f s", name, wall)
    summary, wall = broadcast_object((summary, wall))
    return StageResult(name, summary, False, wall, fingerprint)


def upstream_fingerprint(ctx: StageContext, name: str) -> str | None:
    """The fingerprint of a finished upstream stage (None if it has not finished)."""
    done = ctx.stage_dir(name) / "done.json"
    try:
        return read_json(done).get("fingerprint") if done.is_file() else None
    except (OSError, ValueError):
        return None


def environment_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info

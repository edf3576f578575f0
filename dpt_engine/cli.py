"""The ``dpt`` command line.

    dpt run     [--preset NAME | --config FILE] [--out DIR] [key=value ...]   all stages
    dpt stage1  [...]                                                         one stage
    dpt sample  [--checkpoint PATH] [...]                                     pseudo images + FID
    dpt stage3  [...]
    dpt presets                                                               list presets
    dpt config  [--preset NAME | --config FILE] [key=value ...]               print the resolved config
    dpt bench   train|sample|kernels|all [--model P] [--batch N] [--steps N]  benchmarks vs baselines

Overrides use dotted keys into the config (``dpt_engine/config/schema.py``), e.g.
``data.labels_per_class=2 stage1.steps=3000 run.device=cuda``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from pathlib import Path

import yaml

# Nothing imported at module level loads torch (so ``main`` can set the OpenMP defaults first).
from .config.base import ConfigError, to_dict
from .config.presets import PRESETS, list_presets, resolve_config

__all__ = ["main"]


def set_process_defaults() -> None:
    """Process-wide defaults of the ``dpt`` command (a value the user set is kept).

    ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads that spin while waiting make a loaded CPU (a
    laptop running anything else, a shared CI box) up to 5-20x slower for the many small ops of
    small models: measured here, a U-ViT training step took 3.9 s with spinning threads vs 0.69 s
    with passive waits while other jobs ran. OpenMP reads the variable when torch loads its
    runtime, so this runs before anything imports torch.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _add_common(p: argparse.ArgumentParser, with_out: bool = True) -> None:
    p.add_argument("--preset", choices=list_presets(), help="named preset (default: digits)")
    p.add_argument("--config", help="YAML config file (merged over the preset)")
    if with_out:
        p.add_argument("--out", help="run directory (default: runs/<preset>)")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stage1.steps=500"
    )


_STAGE2_EPILOG = """\
training at scale (every rank runs the same command; rank 0 writes the artifacts):
  one machine, 8 GPUs:
    torchrun --nproc_per_node=8 -m dpt_engine.cli stage2 --out runs/in1k \\
        stage2.strategy=ddp stage2.precision=bf16 stage2.batch_size=1024
  several machines (run on each, NODE_RANK = 0..N-1, HOST = the first machine):
    torchrun --nnodes=N --node_rank=NODE_RANK --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=dpt \\
        -m dpt_engine.cli stage2 --out /shared/runs/in1k stage2.strategy=fsdp2 ...
  the DeepSpeed launcher (hostfile lists the machines):
    deepspeed --hostfile=hostfile --no_local_rank --module dpt_engine.cli stage2 --out /shared/runs/in1k \\
        stage2.strategy=deepspeed stage2.zero_stage=2 stage2.precision=bf16
  options: stage2.grad_accum=K, stage2.grad_checkpointing=true, stage2.compile=true,
    stage2.offload_optimizer=true (deepspeed), stage2.tensorboard=true; stage2.batch_size is the
    global batch (a multiple of world size x grad_accum). The run directory must be on a file
    system every rank sees. Re-run the same command to resume from stage2/checkpoints/.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpt", description="Dual Pseudo Training engine")
    sub = parser.add_subparsers(dest="command", required=True)
    # the commands that take key=value overrides, parsed on their own so that overrides may sit on
    # both sides of an option (argparse's intermixed parsing refuses a parser with sub-commands)
    commands: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(_commands=commands)
    commands["run"] = sub.add_parser("run", help="run the whole DPT pipeline (skips finished stages)")
    commands["stage1"] = sub.add_parser("stage1", help="stage 1: semi-supervised classifier -> pseudo-labels")
    commands["stage2"] = sub.add_parser(
        "stage2",
        help="stage 2: train the class-conditional U-ViT on the pseudo-labels",
        description="Train the class-conditional U-ViT on the pseudo-labels. One process by default; "
        "set stage2.strategy=ddp|fsdp2|deepspeed (stage2.zero_stage=0..3) and launch every rank with "
        "the same command to train across processes and machines.",
        epilog=_STAGE2_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in ("run", "stage1", "stage2"):
        _add_common(commands[name])
    sample = commands["sample"] = sub.add_parser(
        "sample", help="generate pseudo images (DPM-Solver++, guidance) and FID"
    )
    sample.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="U-ViT weights to sample from instead of stage 2's (an original nnet_ema.pth, our "
        "stage2/model.pt or .safetensors); same as sample.checkpoint=PATH",
    )
    _add_common(sample)
    commands["stage3"] = sub.add_parser(
        "stage3", help="stage 3: retrain the classifier on real + pseudo images"
    )
    _add_common(commands["stage3"])
    sub.add_parser("presets", help="list the named presets")
    from .benchmarks.bench_cli import add_arguments as _add_bench_arguments

    _add_bench_arguments(
        sub.add_parser(
            "bench",
            help="benchmarks: training/sampling images/s, MFU and kernels vs baselines (same run)",
            description="Run the training, sampling and kernel benchmarks against their baselines in one "
            "process; print a table and write JSON rows and PNG charts (see benchmarks/README.md).",
        )
    )
    commands["config"] = sub.add_parser("config", help="print the fully resolved config as YAML")
    _add_common(commands["config"], with_out=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``dpt COMMAND ...`` with the overrides allowed before and after the options."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = parser.get_default("_commands")
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def _first_missing_folder(out: Path) -> Path | None:
    """The topmost folder on the way to ``out`` that does not exist yet (``out`` itself when only
    it is missing; None when ``out`` exists): what creating the run directory would add."""
    if out.exists():
        return None
    top = out
    for parent in out.parents:
        if parent.exists():
            break
        top = parent
    return top


def _discard_fresh_out(out: Path, top: Path | None) -> None:
    """The run directory this command created, removed again when bad input stopped the command
    before anything but the log was written, and with it the empty folders created on the way
    (up to ``top``; best effort: the error message matters more)."""
    if top is None:
        return
    from .pipeline import discard_unused_run_dir

    try:
        discard_unused_run_dir(out, created_top=top)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    from .data import DataError  # these load torch: after set_process_defaults
    from .models.checkpoints import CheckpointError

    args = parse_args(argv)
    if args.command == "bench":
        from .benchmarks.bench_cli import run as run_bench

        try:
            return run_bench(args)
        except OSError as e:  # --json / --out into an unwritable or full place
            print(f"dpt: error: {os_error_message(e)}", file=sys.stderr)
            return 2
    if args.command == "presets":
        for name in list_presets():
            d = PRESETS[name].get("data", {})
            s1 = PRESETS[name].get("stage1", {})
            print(
                f"{name:24s} data={d.get('name')} learner={s1.get('learner')} backbone={s1.get('backbone')}"
            )
        return 0
    # a run directory this command creates: removed again if bad input stops it with only its log
    out: Path = Path(".")
    fresh_top: Path | None = None
    try:
        cfg = resolve_config(args.preset, args.config, args.overrides)
        if getattr(args, "checkpoint", None):  # set directly: any path, no YAML parsing of the value
            cfg.sample.checkpoint = str(Path(args.checkpoint).expanduser().resolve())
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from .pipeline import run_pipeline, run_single_stage, setup_run
        from .utils.dist import dist_info, shutdown_distributed

        out = Path(args.out or f"runs/{cfg.preset}")
        fresh_top = _first_missing_folder(out)
        progress = not args.no_progress
        try:
            if args.command == "run":
                report = run_pipeline(cfg, out, progress=progress)
                if dist_info().is_main:  # one summary per job, not one per rank
                    _print_summary(report, out)
            else:
                from .data import build_splits

                splits = build_splits(cfg.data)
                ctx = setup_run(cfg, out, progress)
                res = run_single_stage(args.command, ctx, splits)
                if dist_info().is_main:
                    summary = {k: v for k, v in res.summary.items() if not isinstance(v, dict)}
                    print(yaml.safe_dump({res.name: summary}))
        finally:  # under torchrun: leave the process group before exit, not in C++ destructors
            shutdown_distributed()
        return 0
    except (ConfigError, DataError, CheckpointError) as e:
        _discard_fresh_out(out, fresh_top)
        print(f"dpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpt: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # missing upstream stage, unwritable or full disk, a file where a directory goes
        _discard_fresh_out(out, fresh_top)
        print(f"dpt: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        print(
            f"dpt: error: a file is not valid UTF-8 text ({e.reason}); check the file you passed",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        from .kernels.dispatch import BackendUnavailableError

        if isinstance(e, BackendUnavailableError):
            print(f"dpt: error: {e} (choose another backend in DPT_KERNELS, or unset it)", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            "dpt: internal error: the traceback above is a bug in dpt_engine, not a problem with your "
            "input; please report it with the command you ran (finished stages are kept)",
            file=sys.stderr,
        )
        return 1


def os_error_message(e: OSError) -> str:
    """One line for an operating-system error: what failed and what to do about it."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno is None or not e.strerror:  # raised by us with a full message (e.g. a missing stage)
        return str(e)
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing{where}: free some space, then re-run the same "
            "command (finished stages are kept; the interrupted one resumes from its checkpoint)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror.lower()}; choose a writable place (e.g. --out DIR)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{e.filename or 'a path'} is a file where a directory is needed; check the path (--out takes a directory)"
    if e.errno == errno.ENOENT:
        return f"no such file or directory:{where}; check the path"
    return f"{e.strerror}:{where}"


def _print_summary(report: dict, out: Path) -> None:
    m = report["metrics"]

    def f(k: str) -> str:
        v = m.get(k)
        return "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    print(
        f"\nDPT run ({report['preset']}): stage-1 top-1 {f('stage1.top1')}%, pseudo-label accuracy "
        f"{f('pseudo_labels.accuracy')}%, FID {f('generation.fid')}, stage-3 top-1 {f('stage3.top1')}% "
        f"(gain {f('stage3.gain')})\nreport: {out / 'report.md'}"
    )


def console_main() -> None:
    """The ``dpt`` command and ``python -m dpt_engine.cli``: :func:`main`, then the process exit
    that a multi-process run needs (:func:`dpt_engine.utils.dist.exit_process`)."""
    from .utils.dist import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    console_main()

"""Stage-2 training step: the engine's step against a plain PyTorch step of the original U-ViT design.

Every variant trains its own copy of the same randomly initialised U-ViT (same preset, same
initial weights, same images and hyperparameters), one optimizer step per call, interleaved
``A B C A B C ...`` in one process (``harness``). The engine variants draw the same sequence of
global batches (``dpt_engine.train.batch.draw_global_batch``, same seed); the original assembles
its own, as its code does:

* ``original`` (the baseline): the original U-ViT training step as its code does it
  (baofff/U-ViT ``train_ldm_discrete.py`` / ``utils.py`` / ``datasets.py``, re-expressed here, not
  copied): batches from a ``DataLoader`` (shuffle, ``drop_last``) over a dataset whose items drop
  their label to the null class with probability ``p_uncond`` (one ``random.random()`` per item),
  timesteps ``n`` uniform on ``{1..N}`` from ``np.random.choice``, the noised input built with float64
  numpy coefficients, the per-sample mean-of-squares loss then ``.mean()``, one ``torch.optim.AdamW``
  group over ``nnet.parameters()`` (weight decay on everything), a ``LambdaLR`` warm-up stepped every
  step, ``zero_grad``, and the per-tensor EMA ``p_ema.mul_(rate).add_((1 - rate) * p)`` (a temporary
  per tensor) at a constant rate (no warm-up). Attention: SDPA on q, k, v upcast to fp32 (the
  original's ``.float()``). ``original-amp``: the same under accelerate's mixed precision, on CUDA
  what its README launches (``--mixed_precision fp16``: fp16 autocast with a gradient scaler), on
  a CPU ``--mixed_precision bf16`` (bf16 autocast, no scaler), the counterpart of our bf16 step.
* ``reference`` (not timed): the same step as ``dpt_engine-fp32`` written in plain PyTorch (our
  parameter groups, our batch draws, our EMA warm-up): the correctness reference. One step of every
  timed engine variant from the same weights and batch is compared with it (``*_rel_diff`` rows);
  ``tests/test_bench_cli.py`` asserts the fp32 agreement over two steps.
* ``dpt_engine-fp32``: the step stage 2 runs (``fit_diffusion``'s loop body: ``build_backend``,
  ``draw_global_batch`` / ``micro_batches`` / ``micro_loss``, the backend's forward / backward /
  step / ``ema_update`` through the kernel dispatch, the non-finite-loss guard), in fp32: with
  the baseline it isolates the engine's own changes (fused EMA kernel, fused AdamW on CUDA,
  the attention dispatch).
* ``dpt_engine-bf16``: the same in the device's fastest configuration, ``stage2.precision=bf16``
  (bf16 autocast, fp32 master weights and EMA). ``dpt_engine-bf16`` vs ``dpt_engine-fp32`` is the
  part of the gain that comes from bf16.
* ``dpt_engine-bf16-compile`` (``--compile``): ``dpt_engine-bf16`` with ``stage2.compile=true``.

Per variant: step time (p20/p50/p80), images/s, achieved TFLOP/s and MFU (FLOPs per image from
``dpt_engine.models.uvit.flops_per_forward``, training = 3x forward; the peak of the variant's
compute precision from ``dpt_engine.train.guards.peak_flops``: a datasheet figure on known GPUs,
``DPT_PEAK_TFLOPS``, or on a CPU a measured matmul rate), peak memory (per variant
``torch.cuda.max_memory_allocated`` on a GPU; on a CPU only the process's peak RSS, which covers
every variant and the imports, labelled so), and paired speed-ups against ``original``, each named
by its ``comparison``: ``equal settings`` (``dpt_engine-fp32`` vs ``original``, both fp32, same batch
size; on a CPU also ``dpt_engine-bf16`` vs ``original-amp``, both bf16 autocast) and ``defaults`` (what each gives a user who runs it as documented: ours at
``stage2.precision=auto`` -- fp32 on a CPU, bf16 autocast on CUDA -- against the original in fp32 on a
CPU, ``original-amp`` on CUDA). ``dpt_engine-bf16`` vs ``dpt_engine-fp32`` is named ``precision``: what
bf16 autocast adds, which the original could use too -- never an engine speed-up.

Hyperparameters follow DPT's ImageNet recipe: AdamW lr 2e-4, weight decay 0.03, betas
(0.99, 0.99), no gradient clipping, EMA 0.9999 (with the trainer's warm-up,
``ema_decay_at``), label dropout 0.1, the discrete linear 1000-step schedule.

Run: ``python -m benchmarks.bench_train [--model uvit-tiny28] [--batch 32] [--steps 8] [--compile]``.
"""

from __future__ import annotations

import argparse
import copy
import random
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpt_engine.config.schema import DiffusionConfig
from dpt_engine.diffusion.schedules import NoiseSchedule, make_schedule
from dpt_engine.diffusion.trainer import DiffusionData, train_step
from dpt_engine.kernels import registered_backends, resolve_backend
from dpt_engine.models.uvit import Attention, UViT, create_uvit, flops_per_forward, list_uvits
from dpt_engine.train.batch import GlobalBatch, MicroBatch, draw_global_batch, micro_batches
from dpt_engine.train.ema import ema_decay_at
from dpt_engine.train.engine import Backend, build_backend, param_groups, setup_process_group
from dpt_engine.train.guards import BadStepGuard, peak_flops
from dpt_engine.utils.precision import resolve_precision

from .harness import (
    Row,
    bar_chart,
    device_name,
    load_warning,
    measure_alternating,
    paired_ratio_band,
    print_table,
    summarize,
    write_rows,
)

__all__ = [
    "BASELINE",
    "REFERENCE",
    "VARIANTS",
    "EngineTrainer",
    "OriginalAttention",
    "OriginalTrainer",
    "ReferenceTrainer",
    "build_parser",
    "default_variants",
    "main",
    "make_data",
    "make_trainer",
    "original_uvit",
    "run",
    "train_config",
]

BENCHMARK = "train"
BASELINE = "original"
VARIANTS = ("original", "original-amp", "dpt_engine-fp32", "dpt_engine-bf16", "dpt_engine-bf16-compile")
REFERENCE = "reference"  # the untimed correctness reference (``make_trainer`` accepts it too)


# ---------------------------------------------------------------------------- setup
def train_config(model: str, batch: int, precision: str = "fp32", compile: bool = False) -> DiffusionConfig:
    """Stage 2's config for the benchmark: DPT's ImageNet recipe hyperparameters (see the module
    docstring), single process, no lr warm-up (the lr is constant over the timed steps)."""
    cfg = DiffusionConfig(
        model=model,
        batch_size=batch,
        lr=2e-4,
        weight_decay=0.03,
        beta1=0.99,
        beta2=0.99,
        warmup_steps=0,
        grad_clip=None,
        ema_decay=0.9999,
        label_dropout=0.1,
        schedule="discrete-linear",
        strategy="single",
        precision=precision,  # type: ignore[arg-type]
        compile=compile,
    )
    cfg.validate()
    return cfg


def make_data(net: UViT, rows: int, seed: int = 0) -> DiffusionData:
    """``rows`` random images in [-1, 1] with random labels, shaped for ``net`` (the draws and the
    step's cost do not depend on the pixel values)."""
    c = net.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, c.in_chans, c.img_size, c.img_size, generator=g) * 2 - 1  # (N, C, H, W)
    y = torch.randint(0, max(c.num_classes, 1), (rows,), generator=g)
    return DiffusionData(x=x, y=y, weight=None, num_classes=c.num_classes)


class OriginalAttention(nn.Module):
    """The original U-ViT attention: packed qkv projection, q, k, v upcast to fp32, PyTorch SDPA.

    Owns the same ``qkv`` / ``proj`` layers as ``dpt_engine.models.uvit.Attention`` (same
    parameter names, so state dicts are interchangeable); only the attention call differs: no
    kernel dispatch, always fp32."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv = attn.qkv
        self.proj = attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).float().unbind(0)  # 3 x (B, H, N, Dh), fp32
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, H*Dh)
        return self.proj(out)


def original_uvit(net: UViT) -> UViT:
    """A deep copy of ``net`` (same weights) whose attention layers are ``OriginalAttention``."""
    base = copy.deepcopy(net)
    for block in [*base.in_blocks, base.mid_block, *base.out_blocks]:
        block.attn = OriginalAttention(block.attn)
    return base


def _ema_backend(tensors: Sequence[torch.Tensor]) -> str:
    """Name of the ``ema`` backend the kernel dispatch picks for ``tensors``."""
    fn = resolve_backend("ema", tensors)
    return next((name for name, b in registered_backends("ema").items() if b.fn is fn), "unknown")


@dataclass
class _Batches:
    """The global-batch stream of one variant: its own generator, the same seed as the others."""

    data: DiffusionData
    cfg: DiffusionConfig
    schedule: NoiseSchedule
    device: torch.device
    gen: torch.Generator

    def next(self) -> tuple[GlobalBatch, MicroBatch]:
        batch = draw_global_batch(
            self.data, self.cfg.batch_size, self.schedule, self.gen, self.cfg.hflip, self.cfg.label_dropout
        )
        (mb,) = micro_batches(batch, self.data, 0, 1, 1, self.device)
        return batch, mb


class ReferenceTrainer:
    """Our training step in plain PyTorch (see the module docstring): the correctness reference,
    not timed. Same parameter groups, batch draws, loss and EMA warm-up as ``dpt_engine-fp32``."""

    name = "reference"

    def __init__(
        self, net: UViT, cfg: DiffusionConfig, data: DiffusionData, device: torch.device, seed: int
    ) -> None:
        self.cfg = cfg
        self.schedule = make_schedule(cfg.schedule)
        self.net = original_uvit(net).to(device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.net, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
        )
        self.batches = _Batches(data, cfg, self.schedule, device, torch.Generator().manual_seed(seed))
        self.steps = 0

    def model(self) -> nn.Module:
        return self.net

    def ema_model(self) -> nn.Module:
        return self.ema

    def step(self) -> torch.Tensor:
        _, mb = self.batches.next()
        xt = self.schedule.add_noise(mb.x0, mb.noise, mb.t)
        pred = self.net(xt, self.schedule.network_time(mb.t), mb.y)
        loss = F.mse_loss(pred, mb.noise)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        decay = ema_decay_at(self.steps, self.cfg.ema_decay)
        with torch.no_grad():
            for (_, p_ema), (_, p) in zip(self.ema.named_parameters(), self.net.named_parameters()):
                p_ema.mul_(decay).add_(p, alpha=1 - decay)
        self.steps += 1
        return loss.detach()


class _CFGDataset(Dataset):
    """The original's labelled training set for classifier-free guidance: item ``i`` is
    ``(x[i], y[i])``, its label replaced by the null class ``K`` with probability ``p_uncond`` (one
    ``random.random()`` per item) and, with ``flip``, the image mirrored with probability 1/2."""

    def __init__(self, data: DiffusionData, p_uncond: float, flip: bool, rng: random.Random) -> None:
        self.x, self.y, self.k = data.x, data.y, data.num_classes
        self.p_uncond, self.flip, self.rng = p_uncond, flip, rng

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if self.flip and self.rng.random() < 0.5:
            x = x.flip(-1)
        y = self.k if self.rng.random() < self.p_uncond else int(self.y[i])
        return x, y


def _stp(s: np.ndarray, ts: torch.Tensor) -> torch.Tensor:
    """The original's scalar-tensor product: per-sample float64 numpy coefficients times a batch."""
    return torch.from_numpy(s).type_as(ts).view(-1, *([1] * (ts.dim() - 1))) * ts


class OriginalTrainer:
    """The original U-ViT training step as its code does it (see the module docstring); ``amp``:
    fp16 autocast with a gradient scaler, what its README launches on GPUs (CUDA only)."""

    name = BASELINE

    def __init__(
        self,
        net: UViT,
        cfg: DiffusionConfig,
        data: DiffusionData,
        device: torch.device,
        seed: int,
        amp: bool = False,
    ) -> None:
        self.cfg, self.device, self.amp = cfg, device, amp
        # accelerate's mixed precision: fp16 + GradScaler on CUDA (the README's launch), bf16 on a CPU
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        if amp:
            self.name = "original-amp"
        self.net = original_uvit(net).to(device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)
        )
        warmup = cfg.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(step / warmup, 1.0) if warmup > 0 else 1.0
        )
        self.scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
        # the schedule as float64 numpy arrays over n = 0..N (n = 0: no noise)
        betas = np.append(0.0, make_schedule(cfg.schedule).betas.double().numpy())
        self.cum_alphas = np.cumprod(1.0 - betas)
        self.cum_betas = 1.0 - self.cum_alphas
        self.n_choices = list(range(1, len(betas)))
        self.np_rng = np.random.RandomState(seed)
        self.gen = torch.Generator(device).manual_seed(seed)
        dataset = _CFGDataset(data, cfg.label_dropout, cfg.hflip, random.Random(seed))
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self._it = iter(self.loader)
        self.steps = 0

    def model(self) -> nn.Module:
        return self.net

    def ema_model(self) -> nn.Module:
        return self.ema

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self._it)
        except StopIteration:  # the original's endless data generator: a new epoch
            self._it = iter(self.loader)
            x, y = next(self._it)
        return x.to(self.device), y.to(self.device)

    def _loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self.np_rng.choice(self.n_choices, (len(x0),))
        eps = torch.randn(x0.shape, generator=self.gen, device=x0.device, dtype=x0.dtype)
        xn = _stp(self.cum_alphas[n] ** 0.5, x0) + _stp(self.cum_betas[n] ** 0.5, eps)
        eps_pred = self.net(xn, torch.tensor(n, device=x0.device), y)
        return (eps - eps_pred).pow(2).flatten(1).mean(-1)  # per-sample mean of squares

    def step(self) -> torch.Tensor:
        x0, y = self._batch()
        self.optimizer.zero_grad()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            loss = self._loss(x0, y)
        if self.scaler is not None:
            self.scaler.scale(loss.mean()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.mean().backward()
            self.optimizer.step()
        self.lr_scheduler.step()
        rate = self.cfg.ema_decay
        src = dict(self.net.named_parameters())
        for name, p_ema in self.ema.named_parameters():
            p_ema.data.mul_(rate).add_((1 - rate) * src[name].data)
        self.steps += 1
        return loss.detach().mean()


class EngineTrainer:
    """Our training step: ``dpt_engine.diffusion.trainer.train_step``, the loop body ``fit_diffusion``
    runs, on a ``build_backend`` backend (one process): the same draws, lr schedule, loss, guard,
    optimizer step and dispatched EMA update as a stage-2 run."""

    def __init__(
        self,
        name: str,
        net: UViT,
        cfg: DiffusionConfig,
        data: DiffusionData,
        device: torch.device,
        seed: int,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.schedule = make_schedule(cfg.schedule)
        self.info = setup_process_group(cfg.strategy, device)
        self.backend: Backend = build_backend(copy.deepcopy(net).train(), cfg, device, self.info)
        self.guard = BadStepGuard(cfg.max_bad_steps)
        self.data, self.device = data, device
        self.gen = torch.Generator().manual_seed(seed)  # the seed _Batches gives the baseline
        self.steps = 0

    def model(self) -> nn.Module:
        return self.backend.net

    def ema_model(self) -> nn.Module:
        return self.backend.ema

    def step(self) -> torch.Tensor:
        res = train_step(
            self.backend,
            self.data,
            self.cfg,
            self.schedule,
            self.gen,
            self.steps,
            self.guard,
            self.device,
            self.info,
        )
        self.steps += 1
        return res.loss


def make_trainer(
    variant: str,
    net: UViT,
    batch: int,
    data: DiffusionData,
    device: torch.device,
    seed: int = 0,
    model: str = "uvit-tiny8",
) -> OriginalTrainer | ReferenceTrainer | EngineTrainer:
    """The trainer of ``variant`` (one of ``VARIANTS``, or ``REFERENCE``) on a copy of ``net``
    (``model``: its preset name, recorded in the config)."""
    if variant not in (*VARIANTS, REFERENCE):
        raise ValueError(f"unknown training variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant in (BASELINE, "original-amp"):
        return OriginalTrainer(net, train_config(model, batch), data, device, seed, amp=variant != BASELINE)
    if variant == REFERENCE:
        return ReferenceTrainer(net, train_config(model, batch), data, device, seed)
    precision = "fp32" if variant == "dpt_engine-fp32" else "bf16"
    cfg = train_config(model, batch, precision, compile=variant == "dpt_engine-bf16-compile")
    return EngineTrainer(variant, net, cfg, data, device, seed)


def default_variants(device: torch.device, compile: bool = False) -> list[str]:
    """What runs without ``--variants``: the original in fp32 and under accelerate's mixed
    precision, ours in fp32 and bf16 (and compiled with ``compile``)."""
    skip = {"dpt_engine-bf16-compile"} if not compile else set()
    return [v for v in VARIANTS if v not in skip]


def comparisons(device: torch.device) -> list[tuple[str, str, str]]:
    """``(variant, baseline, comparison)`` of the reported speed-ups. ``equal settings``: same
    precision and batch; ``defaults``: each as its documentation runs it (ours at
    ``stage2.precision=auto``); ``precision``: what bf16 autocast adds to our step; ``compile``:
    what ``torch.compile`` adds."""
    ours_default = "dpt_engine-" + resolve_precision("auto", device, "stage2.precision")
    original_default = "original-amp" if device.type == "cuda" else BASELINE
    return [
        ("dpt_engine-fp32", BASELINE, "equal settings"),
        # both bf16 autocast on a CPU; on CUDA the original's mixed precision is fp16
        *([("dpt_engine-bf16", "original-amp", "equal settings")] if device.type != "cuda" else []),
        (ours_default, original_default, "defaults"),
        ("dpt_engine-bf16", "dpt_engine-fp32", "precision"),
        ("dpt_engine-bf16-compile", "dpt_engine-bf16", "compile"),
    ]


# ---------------------------------------------------------------------------- measurement
def _state_diff(a: nn.Module, b: nn.Module) -> float:
    """max |a - b| / max |b| over the parameters (same names in both)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    num = max(float((pa[k].detach().float() - pb[k].detach().float()).abs().max()) for k in pb)
    den = max(float(p.detach().float().abs().max()) for p in pb.values())
    return num / max(den, 1e-30)


def _peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train",
        description="Stage-2 training step: dpt_engine (fp32, bf16[, compile]) vs the original U-ViT design.",
    )
    p.add_argument("--model", default="uvit-tiny28", choices=list_uvits(), help="U-ViT preset")
    p.add_argument("--batch", type=int, default=32, help="global batch (images per step)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (interleaved rounds)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed interleaved rounds after the agreement step"
    )
    p.add_argument("--compile", action="store_true", help="add dpt_engine-bf16-compile (torch.compile)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="variants to run (default: all but the compiled one, which --compile adds); without "
        "original there are no agreement and speed-up-vs-original rows",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch stream")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", type=Path, default=None, help="rows out (default <results>/train_<dev>.json)")
    p.add_argument("--png", type=Path, default=None, help="chart out (default <results>/train_<dev>.png)")
    return p


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU")
    if args.batch < 1 or args.steps < 1:
        raise SystemExit(f"--batch and --steps must be >= 1 (got {args.batch}, {args.steps})")
    busy = load_warning()
    if busy:
        print(f"WARNING: {busy}")
    torch.manual_seed(args.seed)
    net = create_uvit(args.model)
    data = make_data(net, max(8 * args.batch, 256), args.seed)
    if args.variants is not None:
        names = [v for v in VARIANTS if v in args.variants]
    else:
        names = default_variants(device, args.compile)
    trainers = {v: make_trainer(v, net, args.batch, data, device, args.seed, args.model) for v in names}

    # Agreement: the first step of every engine variant against the plain-PyTorch reference from
    # the same weights on the same batch (the original draws its own batches: no agreement rows).
    reference = make_trainer(REFERENCE, net, args.batch, data, device, args.seed, args.model)
    ref_loss = float(reference.step())
    first_loss = {v: float(tr.step()) for v, tr in trainers.items()}
    others = [v for v in names if v.startswith("dpt_engine")]
    loss_rel = {v: abs(first_loss[v] - ref_loss) / abs(ref_loss) for v in others}
    weight_rel = {v: _state_diff(trainers[v].model(), reference.model()) for v in others}
    ema_rel = {v: _state_diff(trainers[v].ema_model(), reference.ema_model()) for v in others}
    del reference
    if others:
        print("agreement after one step from the same state (relative to the plain-PyTorch reference):")
    for v in loss_rel:
        print(f"  {v:<24} loss {loss_rel[v]:.2e}  weights {weight_rel[v]:.2e}  ema {ema_rel[v]:.2e}")

    peak_mem: dict[str, float] = dict.fromkeys(names, 0.0)

    def timed(v: str) -> Callable[[], None]:
        tr = trainers[v]

        def call() -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            tr.step()
            if cuda:
                peak_mem[v] = max(peak_mem[v], torch.cuda.max_memory_allocated(device) / 2**20)

        return call

    times = measure_alternating({v: timed(v) for v in names}, repeats=args.steps, warmup=args.warmup)

    fwd = flops_per_forward(net.cfg)
    train_flops = 3.0 * fwd * args.batch  # per step
    peaks = {bf16: peak_flops(device, bf16) for bf16 in (False, True)}
    engine = next((tr for tr in trainers.values() if isinstance(tr, EngineTrainer)), None)
    ema_tensors = [] if engine is None else [*engine.backend.ema_params, *engine.backend.net_params]
    config: dict[str, Any] = {
        "model": args.model,
        "params": sum(p.numel() for p in net.parameters()),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "flops_per_image_forward": fwd,
        "flops_per_step": train_flops,
        "threads": torch.get_num_threads(),
        "ema_backend": _ema_backend(ema_tensors) if ema_tensors else None,
        "fused_adamw": True,  # SingleBackend: fused AdamW on every device
        "load_warning": busy,
    }
    dev = device_name(device)
    rows: list[Row] = []

    def row(variant: str, metric: str, value: float, unit: str, cfg: dict[str, Any], **kw: Any) -> Row:
        return Row(BENCHMARK, variant, metric, float(value), unit, config=cfg, device=dev, **kw)

    for v in names:
        bf16 = v in ("dpt_engine-bf16", "dpt_engine-bf16-compile")
        precision = (
            "bf16 autocast"
            if bf16 or (v == "original-amp" and not cuda)
            else "fp16 autocast + GradScaler"
            if v == "original-amp"
            else "fp32"
        )
        peak, source = peaks[bf16 or v == "original-amp"]  # fp16 and bf16 share a tensor-core peak
        cfg = {**config, "precision": precision, "compile": v.endswith("compile"),
               "peak_tflops": peak / 1e12 if peak else None, "peak_source": source}  # fmt: skip
        s = summarize(times[v])
        rows.append(row(v, "step_time", s["p50"], "s", cfg, p20=s["p20"], p80=s["p80"]))
        ips = (args.batch / s["p50"], args.batch / s["p80"], args.batch / s["p20"])
        rows.append(row(v, "throughput", ips[0], "img/s", cfg, p20=ips[1], p80=ips[2]))
        tf = [train_flops / t / 1e12 for t in (s["p50"], s["p80"], s["p20"])]
        rows.append(row(v, "tflops", tf[0], "TFLOP/s", cfg, p20=tf[1], p80=tf[2]))
        if peak:
            rows.append(row(v, "mfu", tf[0] * 1e12 / peak, "fraction", cfg, p20=tf[1] * 1e12 / peak,
                            p80=tf[2] * 1e12 / peak))  # fmt: skip
        if cuda:
            rows.append(
                row(
                    v, "peak_memory", peak_mem[v], "MiB", {**cfg, "memory": "torch.cuda.max_memory_allocated"}
                )
            )
        if v in others:
            rows.append(row(v, "loss_rel_diff", loss_rel[v], "rel", cfg, baseline=REFERENCE))
            rows.append(row(v, "weights_rel_diff", weight_rel[v], "rel", cfg, baseline=REFERENCE))
            rows.append(row(v, "ema_rel_diff", ema_rel[v], "rel", cfg, baseline=REFERENCE))
    for v, ref, comparison in comparisons(device):
        if v in times and ref in times:
            band = paired_ratio_band(times[ref], times[v])
            r, cmp_cfg = band["p50"], {**config, "comparison": comparison}
            rows.append(
                row(v, "speedup", r, "x", cmp_cfg, baseline=ref, ratio=r, p20=band["p20"], p80=band["p80"])
            )
    if not cuda:
        note = (
            "process peak RSS (ru_maxrss): every variant, the data and the imports together; not per variant"
        )
        rows.append(row("process", "peak_rss", _peak_rss_mib(), "MiB", {**config, "memory": note}))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point; returns the rows as dicts (also written to ``--json``)."""
    from .bench_attention import device_slug
    from .bench_cli import results_root

    args = build_parser().parse_args(argv)
    slug = device_slug(args.device)
    root = results_root()
    json_path = args.json or root / f"{BENCHMARK}_{slug}.json"
    png_path = args.png or root / f"{BENCHMARK}_{slug}.png"
    prev = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(prev)  # main() may be called in-process (dpt bench, tests)
    write_rows(json_path, rows)
    print_table(rows)
    title = (
        f"Stage-2 training step, {args.model}, batch {args.batch} (medians of {args.steps} interleaved steps)"
    )
    bar_chart(rows, png_path, title, metric=["throughput", "tflops"], muted=(BASELINE, "original-amp"))
    print(f"wrote {json_path} and {png_path}")
    return [r.to_dict() for r in rows]


if __name__ == "__main__":
    main()

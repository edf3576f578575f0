"""One batch of pseudo images: per-sample noise -> guided DPM-Solver++ -> batched decode.

:class:`BatchSampler` is what every rank calls for each batch of (class, index) pairs. The hot
loop is free of host synchronisation: guidance takes one forward of the doubled batch or two of
the batch, whichever ``guidance_forwards`` (measured per device type) says is faster
(``doubled_eps_fn``, with the guidance combination fused into the solver step when the data
prediction is not clipped), the solver reads its coefficients from a device table prepared once
(``solver_step_table``), and the result stays on the device until the caller copies it out
asynchronously. On GPUs the network runs under bf16 autocast (``precision``; the solver state
stays fp32) and, with ``cuda_graph=True``, the whole loop of a full batch (all steps plus the
decode) is captured once and replayed, which removes the per-kernel launch cost.

Timing: on the CPU every section is timed with ``perf_counter`` (work is synchronous). On CUDA
the sections are timed with CUDA events, read only once they have completed (no added syncs);
a replayed graph is one section, split into model and solver time in the proportions measured
on the eager warm-up batch that precedes the capture.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch

from ..diffusion.guidance import cfg_eps_fn, clip_denoised_fn, doubled_eps_fn, resolve_guidance_forwards
from ..diffusion.noise import initial_noise
from ..kernels.solver_step import sample_multistep_fused, solver_step_table
from ..utils.pixels import model_space_to_uint8
from ..utils.precision import resolve_precision

__all__ = ["BatchSampler", "SectionTimer"]


class SectionTimer:
    """Accumulated seconds per named section, without host syncs on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self.enabled = True

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
            if len(self._events) > 4096:
                self._resolve(completed_only=True)
        else:
            t0 = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def _resolve(self, completed_only: bool) -> None:
        keep = []
        for name, start, end in self._events:
            if completed_only and not end.query():
                keep.append((name, start, end))
                continue
            end.synchronize()  # already complete unless this is the final read-out
            self.add(name, start.elapsed_time(end) / 1000.0)
        self._events = keep

    def read(self) -> dict[str, float]:
        """Totals so far (on CUDA this waits for the recorded sections to finish)."""
        self._resolve(completed_only=False)
        return dict(self.totals)


class BatchSampler:
    """``sampler(classes, indices)`` -> uint8 images (B, C, H, W) or latents (B, c, h, w) on
    ``device``.

    Args:
        net: ``net(x, t_net, y) -> eps``, the class-conditional U-ViT (eval mode).
        solver: a ``DPMSolverPP``; multistep solvers run the fused, table-driven loop.
        schedule: the noise schedule the net was trained with.
        latent_shape: (C, h, w) the solver works in.
        num_classes: the null class index for guidance (the net's ``num_classes``).
        conditional: False for an unconditional net (no labels, no guidance).
        guidance_scale: ``w`` in ``cond + w (cond - uncond)``.
        seed: run seed; sample (c, i) starts from ``initial_noise(seed, c, i)``.
        clip: clip the data prediction to [-1, 1] (pixel-space models).
        decode: latents -> images in [-1, 1] (the autoencoder's decode; None = identity).
        output: ``"images"`` (decode + uint8) or ``"latents"`` (the solver's fp32 output).
        precision: ``fp32``, ``bf16`` or ``auto`` (see :func:`resolve_precision`).
        cuda_graph: capture the loop of full batches in a CUDA graph (CUDA only).
        backend: the solver-step kernel backend (None = dispatch default).
        guidance_forwards: ``doubled`` (one forward of 2B), ``two`` (two of B) or ``auto`` (the
            measured faster one for the device type, ``resolve_guidance_forwards``).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        solver: Any,
        schedule: Any,
        latent_shape: Sequence[int],
        num_classes: int,
        *,
        conditional: bool = True,
        guidance_scale: float = 0.4,
        seed: int = 0,
        clip: bool = False,
        decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        output: str = "images",
        device: torch.device | str = "cpu",
        precision: str = "auto",
        cuda_graph: bool = False,
        backend: Optional[str] = None,
        guidance_forwards: str = "auto",
    ):
        if output not in ("images", "latents"):
            raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"sample.cuda_graph=true needs a CUDA device, but sampling runs on {self.device}; "
                "set sample.cuda_graph=false"
            )
        self.net = net
        self.solver = solver
        self.schedule = schedule
        self.shape = tuple(int(s) for s in latent_shape)
        self.num_classes = num_classes
        self.conditional = conditional
        self.scale = float(guidance_scale) if conditional else 0.0
        self.seed = seed
        self.clip = clip
        self.decode = decode
        self.output = output
        self.precision = resolve_precision(precision, self.device, "sample.precision")
        self.cuda_graph = cuda_graph
        self.guidance_forwards = resolve_guidance_forwards(guidance_forwards, self.device)
        self.backend = backend
        self.fused = getattr(solver, "method", None) == "multistep"
        self.table = solver_step_table(solver, self.device) if self.fused else None
        self.timer = SectionTimer(self.device)
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # model / decode shares of an eager full batch, to split the time of graph replays
        self._split: Optional[tuple[float, float]] = None

    # -- pieces --------------------------------------------------------------------------------
    def noise(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """fp32 (B, *latent_shape) on the CPU, row b from the seed of (classes[b], indices[b])."""
        return initial_noise(self.seed, classes, indices, self.shape, dtype=torch.float32, device="cpu")

    def _net(self, *args: torch.Tensor) -> torch.Tensor:
        with self.timer.section("model"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                return self.net(*args)

    def _solve(self, x_T: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x_T (B, ...) fp32 and labels (B,) on the device -> the solver's output."""
        labels = y if self.conditional else None
        if self.fused and not self.clip and self.scale != 0:
            fn = doubled_eps_fn(self._net, labels, self.num_classes, self.schedule, self.guidance_forwards)
            return sample_multistep_fused(
                self.solver, fn, x_T, guidance_scale=self.scale, table=self.table, backend=self.backend
            )
        null = self.num_classes if self.conditional else None
        fn = cfg_eps_fn(self._net, labels, self.scale, null, self.schedule, self.guidance_forwards)
        if self.clip:
            fn = clip_denoised_fn(fn, self.schedule)
        if self.fused:
            return sample_multistep_fused(self.solver, fn, x_T, table=self.table, backend=self.backend)
        return self.solver.sample(fn, x_T)

    def _run(self, x_T: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.timer.section("loop"):
            x0 = self._solve(x_T, y)
        if self.output == "latents":
            return x0
        with self.timer.section("decode"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                img = x0 if self.decode is None else self.decode(x0)
            return model_space_to_uint8(img)

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _capture(self, batch: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        static_x = torch.zeros((batch, *self.shape), dtype=torch.float32, device=self.device)
        static_y = torch.zeros((batch,), dtype=torch.int64, device=self.device)
        self.timer.enabled = False
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                self._run(static_x, static_y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._run(static_x, static_y)
        finally:
            self.timer.enabled = True
        return graph, static_x, static_y, static_out

    # -- entry point ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, classes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        with self.timer.section("noise"):
            x_T = self.noise(classes, indices)
            y = classes.to(torch.int64)
            if self.device.type == "cuda":
                x_T = x_T.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
        batch = len(classes)
        graph = self._graphs.get(batch) if self.cuda_graph else None
        if self.cuda_graph and graph is None and self._split is not None:
            graph = self._graphs[batch] = self._capture(batch)
        if graph is None:
            before = self.timer.read() if self.cuda_graph else None
            out = self._run(x_T, y)
            if before is not None:  # the eager warm-up batch: remember how its time splits
                after = self.timer.read()
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("model", "loop", "decode")}
                total = d["loop"] + d["decode"]
                self._split = (d["model"] / total, d["decode"] / total) if total > 0 else (0.0, 0.0)
            return out
        g, static_x, static_y, static_out = graph
        with self.timer.section("graph"):
            static_x.copy_(x_T)
            static_y.copy_(y)
            g.replay()
            return static_out.clone()  # the next replay overwrites static_out

    def timings(self) -> dict[str, float]:
        """Seconds by part: ``noise``, ``model``, ``solver`` (loop minus model), ``decode``."""
        t = self.timer.read()
        model = t.get("model", 0.0)
        solver = t.get("loop", 0.0) - model
        decode = t.get("decode", 0.0)
        graph = t.get("graph", 0.0)
        if graph:
            m, d = self._split or (0.0, 0.0)
            model += graph * m
            decode += graph * d
            solver += graph * (1 - m - d)
        return {"noise": t.get("noise", 0.0), "model": model, "solver": max(solver, 0.0), "decode": decode}

"""Batched, generator-driven data augmentation for semi-supervised learning.

All functions take float images in ``[0, 1]`` of shape ``(B, C, H, W)`` on any device and a
``torch.Generator``. Every random number is drawn from that generator, on the generator's own
device, in a fixed order that does not depend on the data; so the same generator state gives the
same augmentation on CPU and GPU (up to floating-point rounding), and a training run that saves
and restores the generator state resumes bit-identically. Nothing loops over samples: per-sample
parameters are tensors, geometric ops are one ``affine_grid`` / ``grid_sample`` per round, and
each colour op runs once on the subset of samples that drew it.

* ``weak``: random translation by up to 12.5 % of the side (reflect pad + random crop) and an
  optional horizontal flip (FixMatch's weak augmentation, Sohn et al. 2020).
* ``strong``: ``weak`` + RandAugment with random magnitudes (FixMatch's "RA" variant): 2 ops per
  sample drawn uniformly from :data:`STRONG_OPS`, each with a magnitude ``m ~ U(0, 1)``, then
  Cutout (a gray square with side ``U(0, 0.5)`` of the image side).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["STRONG_OPS", "strong", "weak"]

STRONG_OPS: tuple[str, ...] = (
    "identity",
    "autocontrast",
    "brightness",
    "contrast",
    "equalize",
    "sharpness",
    "posterize",
    "solarize",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_FILL = 0.5  # gray fill for pixels moved in from outside and for Cutout (FixMatch uses 128/255)


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    """``U(0, 1)`` numbers drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


# --------------------------------------------------------------------------------------------
# weak
# --------------------------------------------------------------------------------------------


def weak(
    x: torch.Tensor, gen: torch.Generator, hflip: bool = False, max_shift: float = 0.125
) -> torch.Tensor:
    """Random translate (reflect pad by ``round(max_shift * side)`` + random crop) + optional hflip.

    Draws, in order: crop offsets ``(B, 2)``, flip coins ``(B,)`` (always drawn, so the stream
    does not depend on ``hflip``).
    """
    b, c, h, w = x.shape
    pad_h, pad_w = round(max_shift * h), round(max_shift * w)
    u = _rand(gen, b, 2, device=x.device)
    flip = _rand(gen, b, device=x.device) < 0.5
    if pad_h or pad_w:
        pad_h, pad_w = min(pad_h, h - 1), min(pad_w, w - 1)  # reflect padding needs pad < side
        xp = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect")  # (B, C, H + 2ph, W + 2pw)
        oy = (u[:, 0] * (2 * pad_h + 1)).long().clamp_(max=2 * pad_h)  # (B,) crop offsets
        ox = (u[:, 1] * (2 * pad_w + 1)).long().clamp_(max=2 * pad_w)
        rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
        wp = w + 2 * pad_w
        flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        x = xp.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)
    if hflip:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# --------------------------------------------------------------------------------------------
# colour ops: (x (n, C, H, W), m (n,) magnitude in [0, 1], s (n,) random sign) -> (n, C, H, W)
# --------------------------------------------------------------------------------------------


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: ``b + factor * (a - b)`` (``factor`` 1 = identity)."""
    return (b + factor[:, None, None, None] * (a - b)).clamp_(0.0, 1.0)


def _enhance_factor(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return 1.0 + 0.9 * m * s  # in [0.1, 1.9]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        wts = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        return (x * wts[None, :, None, None]).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _autocontrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0.0, 1.0)


def _brightness(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), _enhance_factor(m, s))


def _contrast(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(x, mean, _enhance_factor(m, s))


def _sharpness(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = (
        torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype)
        / 13.0
    )
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    return _blend(x, blurred, _enhance_factor(m, s))


def _equalize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation over 256 levels (PIL-like, vectorised)."""
    n, c, h, w = x.shape
    q = (x * 255.0).round_().long().clamp_(0, 255).reshape(n, c, h * w)  # (n, C, HW)
    hist = torch.zeros(n, c, 256, device=x.device, dtype=x.dtype).scatter_add_(
        2, q, torch.ones_like(x).reshape(n, c, -1)
    )
    cdf = hist.cumsum(2)  # (n, C, 256)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(2, keepdim=True)
    denom = (h * w - cdf_min).clamp_min(1.0)
    lut = ((cdf - cdf_min) / denom).clamp_(0.0, 1.0)  # (n, C, 256)
    out = lut.gather(2, q).reshape(n, c, h, w)
    flat = (denom <= 1.0).reshape(n, c, 1, 1)  # constant images stay as they are
    return torch.where(flat, x, out)


def _posterize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    bits = 8 - (m * 4.999).floor()  # 4..8 bits kept
    step = torch.pow(2.0, 8.0 - bits)[:, None, None, None]
    q = (x * 255.0).round()
    return ((q / step).floor() * step / 255.0).clamp_(0.0, 1.0)


def _solarize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    thr = (1.0 - m)[:, None, None, None]  # threshold in [0, 1]; m = 0 -> identity
    return torch.where(x >= thr, 1.0 - x, x)


_COLOUR_FNS = {
    "autocontrast": _autocontrast,
    "brightness": _brightness,
    "contrast": _contrast,
    "equalize": _equalize,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
}


def _affine(op_idx: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-sample 2x3 affine matrices (normalised coordinates) for the geometric ops; identity elsewhere.

    rotate: +-30 degrees; shear: +-0.3; translate: +-0.3 of the side (FixMatch's RA ranges).
    """
    n = op_idx.shape[0]
    theta = torch.zeros(n, 2, 3, device=m.device, dtype=m.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    v = m * s
    ang = v * (30.0 * math.pi / 180.0)
    is_op = {name: op_idx == STRONG_OPS.index(name) for name in _GEOMETRIC}
    rot = is_op["rotate"]
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta[:, 0, 0] = torch.where(rot, cos, theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(rot, -sin, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(rot, sin, theta[:, 1, 0])
    theta[:, 1, 1] = torch.where(rot, cos, theta[:, 1, 1])
    theta[:, 0, 1] = torch.where(is_op["shear_x"], 0.3 * v, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(is_op["shear_y"], 0.3 * v, theta[:, 1, 0])
    # translation by a fraction t of the side is 2t in normalised [-1, 1] coordinates
    theta[:, 0, 2] = torch.where(is_op["translate_x"], 0.6 * v, theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(is_op["translate_y"], 0.6 * v, theta[:, 1, 2])
    return theta


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling with a gray fill outside the image."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (n, H, W, 2)
    return F.grid_sample(x - _FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + _FILL


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gray square of side ``u[:, 0] * 0.5 * H`` centred at ``(u[:, 1] * H, u[:, 2] * W)``."""
    _, _, h, w = x.shape
    half = (u[:, 0] * 0.5 * min(h, w) / 2.0)[:, None]  # (B, 1)
    cy, cx = (u[:, 1] * h)[:, None], (u[:, 2] * w)[:, None]
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None] + 0.5  # (1, H) pixel centres
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None] + 0.5
    in_y = (ys - cy).abs() < half  # (B, H)
    in_x = (xs - cx).abs() < half  # (B, W)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return torch.where(box, torch.full_like(x, _FILL), x)


def strong(
    x: torch.Tensor,
    gen: torch.Generator,
    hflip: bool = False,
    num_ops: int = 2,
    ops: tuple[str, ...] = STRONG_OPS,
    cutout: bool = True,
) -> torch.Tensor:
    """``weak`` + RandAugment (``num_ops`` random ops from ``ops``, random magnitudes) + Cutout.

    Draws, in order: ``weak``'s numbers, then per round ``(B,)`` op choices, ``(B,)`` magnitudes,
    ``(B,)`` signs, then ``(B, 3)`` Cutout numbers (always drawn).
    """
    unknown = [o for o in ops if o not in STRONG_OPS]
    if unknown:
        raise ValueError(f"unknown augmentation ops {unknown}; valid: {', '.join(STRONG_OPS)}")
    x = weak(x, gen, hflip)
    b = x.shape[0]
    op_ids = torch.tensor([STRONG_OPS.index(o) for o in ops], device=x.device)
    geo_ids = torch.tensor([STRONG_OPS.index(o) for o in _GEOMETRIC], device=x.device)
    for _ in range(num_ops):
        choice = op_ids[(_rand(gen, b, device=x.device) * len(ops)).long().clamp_(max=len(ops) - 1)]  # (B,)
        m = _rand(gen, b, device=x.device)  # (B,) magnitude in [0, 1]
        s = torch.where(_rand(gen, b, device=x.device) < 0.5, -1.0, 1.0)  # (B,) sign
        for name, fn in _COLOUR_FNS.items():
            sel = (choice == STRONG_OPS.index(name)).nonzero().squeeze(1)
            if sel.numel():
                x = x.index_copy(0, sel, fn(x[sel], m[sel], s[sel]))
        sel = torch.isin(choice, geo_ids).nonzero().squeeze(1)
        if sel.numel():
            theta = _affine(choice[sel], m[sel], s[sel])
            x = x.index_copy(0, sel, _warp(x[sel], theta))
    u = _rand(gen, b, 3, device=x.device)
    if cutout:
        x = _cutout(x, u)
    return x.clamp_(0.0, 1.0)

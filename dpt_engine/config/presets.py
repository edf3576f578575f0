"""Named presets: partial configs merged over the dataclass defaults.

The CLI offers ``--preset`` with ``choices=list_presets()``, and the tests enumerate the
registry, so every preset here is checked to build a valid :class:`PipelineConfig`.
"""

from __future__ import annotations

import copy
from typing import Any

from .base import ConfigError, apply_overrides, from_dict, load_yaml
from .schema import PipelineConfig

__all__ = ["PRESETS", "deep_merge", "get_preset", "list_presets", "resolve_config"]

_FREEMATCH_CIFAR10: dict[str, Any] = {
    "learner": "freematch",
    "backbone": "wrn-28-2",
    "steps": 1048576,
    "batch_size": 64,
    "lr": 0.03,
    "ema_decay": 0.999,
    "uratio": 7,
    "lambda_ent": 0.0,
    "hflip": True,
    "eval_every": 5000,
    "checkpoint_every": 5000,
}

# DPT's ImageNet stage 1 / 3: frozen MSN ViT-B/4 (vitb4_300ep.pth.tar; pass stage1.probe_checkpoint
# and stage3.probe_checkpoint), CLS token of the last block before the final norm, centred and
# L2-normalised features, multinomial logistic regression with lambda = 0.0025 / N, no intercept.
_MSN_PROBE: dict[str, Any] = {
    "learner": "linear-probe",
    "backbone": "msn:vit_base_patch4",
    "probe_l2": 0.0025,
    "probe_l2_per_sample": True,
    "probe_batch_size": 64,
}

# U-ViT-L/2 and U-ViT-H/2 on ImageNet-256 latents as trained and sampled by DPT / U-ViT
# (ML-GSAI/DPT configs/accelerate_b4_subset1_2img_k_128_{large,huge}.py, baofff/U-ViT
# configs/imagenet256_uvit_{large,huge}.py): AdamW lr 2e-4, wd 0.03, betas (0.99, 0.99), 5k linear
# warmup then constant, no gradient clipping, global batch 1024, EMA 0.9999, the SD KL-f8
# autoencoder (scale 0.18215) on every image and its flip, fp16 autocast + gradient checkpointing
# (here: bf16 autocast, stage2.precision=bf16), 50 solver steps, guidance 0.4, K = 128 per class.
_UVIT_IMAGENET256: dict[str, dict[str, Any]] = {
    # L: continuous VP-SDE (linear beta 0.1 -> 20, network time t * 999), 300k steps, label dropout
    # 0.15, autoencoder_kl.pth; sampled with DPM-Solver-fast (order 3, logSNR steps, noise
    # prediction). SUBSTITUTION: DPM-Solver++ singlestep order 3 (data prediction; the same "fast"
    # split of the 50 evaluations), and the last time is the schedule's eps_t 1e-3 (original 1e-4).
    "l2": {
        "stage2": {
            "model": "uvit-l2",
            "schedule": "vp-linear",
            "steps": 300000,
            "label_dropout": 0.15,
            "autoencoder": "assets/stable-diffusion/autoencoder_kl.pth",
        },
        "sample": {"method": "singlestep", "order": 3, "skip_type": "logSNR"},
    },
    # H: 1000-step DDPM with SD's scaled-linear betas (0.00085 -> 0.012), network time n in 1..1000,
    # 500k steps, label dropout 0.1, autoencoder_kl_ema.pth; sampled with DPM-Solver++ singlestep
    # ("fast", order 3, time-uniform steps, data prediction), exactly as sample_ldm_discrete_all.py.
    "h2": {
        "stage2": {
            "model": "uvit-h2",
            "schedule": "discrete-scaled-linear",
            "steps": 500000,
            "label_dropout": 0.1,
            "autoencoder": "assets/stable-diffusion/autoencoder_kl_ema.pth",
        },
        "sample": {"method": "singlestep", "order": 3, "skip_type": "time_uniform"},
    },
}


def _imagenet256(size: str, labels_per_class: int) -> dict[str, Any]:
    """DPT on ImageNet-256 with U-ViT-``size`` and ``labels_per_class`` labels per class (MSN's
    1 / 2 / 5 images-per-class lists: pass ``data.subset_file=<imagenet_subsetsN/Kimgs_class.txt>
    data.labels_per_class=null`` to use the exact published split)."""
    spec = _UVIT_IMAGENET256[size]
    return {
        "data": {"name": "imagefolder", "labels_per_class": labels_per_class, "image_size": 256},
        "stage1": dict(_MSN_PROBE),
        "stage2": {
            "batch_size": 1024,
            "lr": 2e-4,
            "weight_decay": 0.03,
            "beta1": 0.99,
            "beta2": 0.99,
            "warmup_steps": 5000,
            "grad_clip": None,
            "ema_decay": 0.9999,
            "hflip": True,
            "precision": "bf16",
            "grad_checkpointing": True,
            "log_every": 100,
            "checkpoint_every": 5000,
            **spec["stage2"],
        },
        "sample": {
            "images_per_class": 128,
            "steps": 50,
            "guidance_scale": 0.4,
            "batch_size": 256,
            "fid_num_images": 50000,
            **spec["sample"],
        },
        "stage3": dict(_MSN_PROBE),
        "run": {"num_workers": 8},
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: scikit-learn's 8x8 digits (real data, ships with scikit-learn),
    # 1 label per class, a small CNN trained with FreeMatch. Runs on a laptop CPU in ~10 minutes.
    # 1 label/class, not 4: at 4 stage 1 is ~97% on the 500 test images (one image = 0.2 points),
    # which leaves DPT nothing to show (stage 3 96.6 vs 96.8, seed 0); at 1 stage 1 ranges
    # 83-97% over label seeds (README "Two commands").
    # FreeMatch's threshold EMA at 0.99 (paper: 0.999 over 1M steps) adapts within a 1,000-step
    # run: measured 97-98.4% top-1 at k=4 and 88-97% at k=1 over 3 seeds, vs 82% / 72% at 0.999.
    # Stage 2: a 1.5M-parameter U-ViT in pixel space; sampling with logSNR-uniform steps and
    # guidance 1.0 (on these 8x8 images that makes 95% of samples classifiable as their class,
    # vs 82% at DPT's 0.4; measured with a pixel logistic regression, 20 steps).
    "digits": {
        "data": {"name": "digits", "labels_per_class": 1},
        "stage1": {
            "learner": "freematch",
            "backbone": "cnn-small",
            "steps": 1000,
            "batch_size": 16,
            "tau_ema": 0.99,
        },
        "stage2": {"model": "uvit-tiny8", "schedule": "discrete-linear", "steps": 1500, "batch_size": 128},
        "sample": {
            "images_per_class": 100,
            "steps": 20,
            "skip_type": "logSNR",
            "guidance_scale": 1.0,
            "fid_num_images": 250,
        },
        "stage3": {
            "learner": "freematch",
            "backbone": "cnn-small",
            "steps": 1000,
            "batch_size": 16,
            "tau_ema": 0.99,
            # the pseudo images get as large a share of each labeled batch as stage 1 finds them
            # faithful, on top of stage 1's weights (benchmarks/results/stage3_defence.md: a
            # useless generator then costs nothing)
            "pseudo_weighting": "stage1-agreement",
            "init_from_stage1": True,
        },
    },
    # Fashion-MNIST from Debian's dataset-fashion-mnist package, 4 labels per class: the whole DPT
    # pipeline in ~34-43 minutes on 2 CPU cores (README "Fashion-MNIST"). Stage 2 is the recipe that
    # won benchmarks/quality/recipe_search.py at equal wall clock (benchmarks/results/
    # recipe_fashion_mnist.md: oracle class fidelity 88.0% after 6 minutes, against 10.0% for
    # uvit-tiny28): a small convolutional U-Net, Min-SNR-5 loss weighting, lr 2e-3, bf16 autocast.
    # Sampling without guidance, as DPT's CIFAR-10 recipe: on held-out training images stage 3
    # gains +0.82 +- 0.58 with unguided pseudo images against +0.14 +- 0.94 at guidance 1.0 (better at
    # each of 3 seeds; 0.4: +0.29; benchmarks/results/stage3_sweep_fashion-mnist.md), and one forward
    # per step samples twice as fast. Their FID is 3-5 points higher (43-46 vs ~41): guidance makes
    # prettier images, not more useful ones for the classifier.
    # Stage 3 gives the pseudo images a share of each labeled batch set by how often stage 1 agrees
    # with their intended class and fine-tunes stage 1's classifier, so a poor generator cannot
    # drag it below stage 1.
    "fashion-mnist": {
        "data": {"name": "fashion-mnist", "labels_per_class": 4},
        "stage1": {
            "learner": "freematch",
            "backbone": "cnn-small",
            "steps": 1000,
            "hflip": True,
            "tau_ema": 0.99,
            "precision": "bf16",
        },
        "stage2": {
            "model": "unet-tiny28",
            "schedule": "discrete-linear",
            "loss_weighting": "min-snr",
            "lr": 2e-3,
            "warmup_steps": 100,
            "steps": 1800,
            "batch_size": 128,
            "hflip": True,
            "precision": "bf16",
        },
        "sample": {
            "images_per_class": 300,
            "steps": 20,
            "skip_type": "logSNR",
            "guidance_scale": 0.0,
            "batch_size": 128,
            "precision": "bf16",
            "fid_num_images": 2000,
        },
        "stage3": {
            "learner": "freematch",
            "backbone": "cnn-small",
            # 1000 fine-tuning steps: on 5,000 held-out training images (data.holdout=5000, the
            # test split unused; benchmarks/results/stage3_sweep_fashion-mnist_unguided.md) they
            # gain +1.74 / +1.28 over stage 1 at label seeds 0 / 1 against +0.82 / +0.32 for 500
            # steps (1000 steps without pseudo images: +0.18): with unguided pseudo images a longer
            # stage 3 keeps learning (with guided ones it was flat after 250). ~4 more minutes.
            "steps": 1000,
            "hflip": True,
            "tau_ema": 0.99,
            "precision": "bf16",
            "pseudo_weighting": "stage1-agreement",
            "init_from_stage1": True,
        },
    },
    # DPT's CIFAR-10 recipe (ML-GSAI/DPT cifar10_experiment): FreeMatch with WRN-28-2, 40 labels
    # (4 per class), SGD lr 0.03 / momentum 0.9 / wd 5e-4 / nesterov, batch 64 + 7x unlabeled, EMA
    # 0.999, 2^20 iterations, no self-adaptive fairness term (TorchSSL config
    # freematch_cifar10_40_1.yaml: ent_loss_ratio 0) -> pseudo-labels for all 50k -> conditional
    # generator -> 1,000 images per class -> FreeMatch again with them (freematch_cifar10_40_1_aug1000).
    # SUBSTITUTION: the original stage 2 is EDM (ddpmpp, 18-step Heun = 35 network evaluations, no
    # guidance); here it is the class-conditional U-ViT-S/2 in pixel space with U-ViT's CIFAR-10
    # hyperparameters (configs/cifar10_uvit_small.py: AdamW lr 2e-4, wd 0.03, betas (0.99, 0.999),
    # batch 128, 2.5k warmup, 500k steps, EMA 0.9999, VP-SDE linear, flips), no label dropout and
    # no guidance (as EDM's --cond=1), sampled with 35 DPM-Solver++(2M) steps (EDM's budget).
    "cifar10": {
        "data": {"name": "cifar10", "labels_per_class": 4},
        "stage1": {**_FREEMATCH_CIFAR10},
        "stage2": {
            "model": "uvit-s2",
            "schedule": "vp-linear",
            "steps": 500000,
            "batch_size": 128,
            "lr": 2e-4,
            "weight_decay": 0.03,
            "beta1": 0.99,
            "beta2": 0.999,
            "warmup_steps": 2500,
            "grad_clip": None,
            "ema_decay": 0.9999,
            "label_dropout": 0.0,
            "hflip": True,
            "checkpoint_every": 5000,
        },
        "sample": {
            "images_per_class": 1000,
            "steps": 35,
            "order": 2,
            "guidance_scale": 0.0,
            "fid_num_images": 10000,
        },
        "stage3": {**_FREEMATCH_CIFAR10},
        "run": {"num_workers": 4},
    },
    # ImageNet (ImageFolder layout), DPT's recipe: frozen self-supervised ViT + L2 logistic
    # regression, 1 label per class from an MSN subset file (pass data.subset_file=...).
    "imagenet-linear-probe": {
        "data": {"name": "imagefolder", "labels_per_class": 1, "image_size": 224},
        "stage1": {
            "learner": "linear-probe",
            "backbone": "timm:vit_base_patch16_224",
            "probe_l2": 0.0025,
            "probe_l2_per_sample": True,
        },
        "stage3": {
            "learner": "linear-probe",
            "backbone": "timm:vit_base_patch16_224",
            "probe_l2": 0.0025,
            "probe_l2_per_sample": True,
        },
        "run": {"num_workers": 8},
    },
    # DPT's ImageNet-256 recipes; the unsuffixed names use 2 labels per class (the published configs).
    **{
        f"imagenet256-uvit-{size}{suffix}": _imagenet256(size, k)
        for size in ("l2", "h2")
        for k, suffix in ((2, ""), (1, "-1img"), (5, "-5img"))
    },
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available presets: {', '.join(list_presets())}")
    return copy.deepcopy(PRESETS[name])


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Preset (default ``digits``) <- YAML file <- ``key=value`` overrides, validated."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data = load_yaml(config_file)
    name = preset or data.get("preset") or "digits"
    merged = deep_merge(get_preset(name), data)
    merged["preset"] = name
    apply_overrides(merged, list(overrides or []), PipelineConfig)
    return from_dict(PipelineConfig, merged)

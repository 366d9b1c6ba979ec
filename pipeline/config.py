"""Run configuration: one frozen dataclass per stage, checked when built."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from deitpipe.shards.reader import is_remote

# Inputs named by the data set rather than by a path.
NAMED_DATA = frozenset({"digits", "digits:train", "digits:val"})

# Fields that do not change what a stage writes: a rerun may change them freely.
_LABEL_RUNTIME_FIELDS = frozenset({"out", "batch_size", "ray_address", "strict", "overwrite",
                                   "num_actors", "device", "progress"})


def absolute_spec(spec: str | None) -> str | None:
    """A path the user gave, as every process of every node reads it.

    Ray workers do not run in the driver's working directory, so a relative local path is made
    absolute on the driver, before any worker sees it. URLs (``s3://``, ``http(s)://``),
    ``pipe:`` commands and named data sets (``digits``) pass through unchanged; a ``::`` list is
    resolved item by item; a brace pattern is resolved as a path.
    """
    if spec is None or spec in NAMED_DATA or is_remote(spec):
        return spec
    if "::" in spec:
        return "::".join(absolute_spec(part) for part in spec.split("::"))
    return os.path.abspath(os.path.expanduser(spec))


def _resolved(config, fields: tuple[str, ...]):
    return replace(config, **{f: absolute_spec(getattr(config, f)) for f in fields})


@dataclass(frozen=True)
class LabelConfig:
    """What ``deitpipe label-teacher`` does.

    Args:
        data: "digits", an ImageFolder directory, or a WebDataset brace pattern.
        out: output directory for shards and manifest.json.
        teacher: torchvision classification model name.
        teacher_weights: local state-dict file; None uses torchvision's weights (hub cache).
        num_classes: teacher head size; None infers it from the weights.
        views: random views per image, besides the global view.
        min_scale: smallest crop area of a random view, as a fraction of the image (DeiT: 0.08).
        topk: stored top-k of each view's softmax.
        full_softmax: store the full softmax (float16) as well.
        shard_size: samples per shard.
        batch_size: views per teacher forward pass.
        seed: seed of the view boxes.
        image_size: size the digits are scaled to (digits only).
        resize, crop, interpolation: teacher preprocessing overrides.
        ray_address: join this Ray cluster ("auto" or host:port); None starts a local one.
        num_actors: teacher actors; None: one per GPU, or one on CPU.
        device: "auto", "cuda" or "cpu" for the teacher.
        strict: fail on the first undecodable input instead of skipping it.
        overwrite: replace an output written with other arguments.
        progress: show a progress bar.
    """

    data: str = "digits"
    out: str = "shards-out"
    teacher: str = "regnet_y_16gf"
    teacher_weights: str | None = None
    num_classes: int | None = None
    views: int = 8
    min_scale: float = 0.08
    topk: int = 10
    full_softmax: bool = False
    shard_size: int = 1000
    batch_size: int = 64
    seed: int = 0
    image_size: int = 32
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    ray_address: str | None = None
    num_actors: int | None = None
    device: str = "auto"
    strict: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "--views": (self.views, 0), "--topk": (self.topk, 1),
            "--shard-size": (self.shard_size, 1), "--batch-size": (self.batch_size, 1),
            "--image-size": (self.image_size, 8),
        }
        for option, (value, low) in checks.items():
            if value < low:
                raise ValueError(f"{option} must be >= {low}, got {value}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"--num-classes must be >= 2, got {self.num_classes}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--num-actors must be >= 1, got {self.num_actors}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.interpolation not in (None, "bilinear", "bicubic", "nearest"):
            raise ValueError(
                f"--interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )

    def resolved(self) -> "LabelConfig":
        """This config with its local paths absolute (:func:`absolute_spec`)."""
        return _resolved(self, ("data", "out", "teacher_weights"))

    def fingerprint(self) -> dict:
        """The fields that decide the output's content, as stored in the manifest."""
        return {k: v for k, v in asdict(self).items() if k not in _LABEL_RUNTIME_FIELDS}


@dataclass(frozen=True)
class TrainConfig:
    """What ``deitpipe train-student`` does.

    Args:
        shards: a label-teacher output directory, or a brace pattern of its shards (local,
            ``s3://``, ``http(s)://`` or a ``pipe:`` command).
        manifest: the manifest's path or URL, when it is not beside the shards (``pipe:``).
        out: the run directory (student.pt, config.json, metrics.jsonl, checkpoints).
        val: held-out data for per-epoch evaluation ("digits:val", ImageFolder, shards), or None.
        model: a named DeiT variant; the overrides below reshape it for small images.
        img_size, patch_size, embed_dim, depth, num_heads, drop_path: model overrides.
        epochs, batch_size (per worker), lr (for a global batch of 512), weight_decay,
        warmup_epochs, min_lr, grad_clip, ema_decay: the optimisation recipe (warmup_epochs
            None: DeiT's 5, or a tenth of --epochs when that is less).
        distillation, alpha, tau: the loss ("none", "soft" or "hard").
        teacher_labels: "views" (replay stored views), "global" (fixed teacher), or None for
            views when the shards have them, else global.
        min_scale: smallest area of the fresh random crops ("global" labels, no distillation).
        rand_augment, random_erasing, mixup, cutmix, mixup_switch, label_smoothing: the DeiT
            recipe's augmentations; 0 or None switches one off (rand_augment is a level 0..10 on
            timm's scale, None for off; rand_augment_std its noise per op, timm's mstd).
        online_teacher, teacher_weights: run this torchvision teacher live on the student's
            batch instead of reading stored labels (the paper's original method).
        num_workers, use_gpu, cpus_per_worker, loader_workers, ray_address: where it runs
            (loader_workers None: see ``pipeline.train.default_loader_workers``).
        compile, channels_last: speed options.
        seed: data order, views and initialisation.
        resume: continue from the last checkpoint in ``out`` (a rerun of the same ``out`` does
            too); False with an existing run refuses unless ``overwrite``.
        finetune: start from this checkpoint (position embedding resampled to img_size).
        stop_after_steps: stop, as if killed, after this many optimizer steps in total.
        keep_checkpoints: how many of the latest epoch checkpoints to keep under ``out/ray``.
        progress: show a progress bar.
    """

    shards: str = "shards-out"
    manifest: str | None = None
    out: str = "student-out"
    val: str | None = None
    model: str = "deit_tiny_distilled_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.1
    epochs: int = 300
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    min_lr: float = 1e-5
    grad_clip: float | None = None
    ema_decay: float | None = None
    distillation: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    teacher_labels: str | None = None
    min_scale: float = 0.08
    rand_augment: float | None = 9
    rand_augment_std: float = 0.5
    random_erasing: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch: float = 0.5
    label_smoothing: float = 0.1
    online_teacher: str | None = None
    teacher_weights: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int | None = None
    loader_workers: int | None = None
    ray_address: str | None = None
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    resume: bool = True
    overwrite: bool = False
    finetune: str | None = None
    stop_after_steps: int | None = None
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for option, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                   ("--num-workers", self.num_workers, 1),
                                   ("--loader-workers", self.loader_workers, 0),
                                   ("--keep-checkpoints", self.keep_checkpoints, 1)):
            if value is not None and value < low:
                raise ValueError(f"{option} must be >= {low}, got {value}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_epochs is None:  # DeiT's 5, or a tenth of a shorter run
            object.__setattr__(self, "warmup_epochs", min(5.0, self.epochs / 10))
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"--warmup-epochs must be in [0, --epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"--tau must be > 0, got {self.tau}")
        if self.distillation not in ("none", "soft", "hard"):
            raise ValueError(f"--distillation must be none, soft or hard, got {self.distillation!r}")
        if self.teacher_labels not in (None, "views", "global"):
            raise ValueError(f"--teacher-labels must be views or global, got {self.teacher_labels!r}")
        if self.online_teacher and self.distillation == "none":
            raise ValueError("--online-teacher needs --distillation soft or hard")
        if self.teacher_weights and not self.online_teacher:
            raise ValueError("--teacher-weights goes with --online-teacher NAME")
        if self.rand_augment is not None and not 0 <= self.rand_augment <= 10:
            raise ValueError(f"--rand-augment must be a level in [0, 10] (DeiT: 9), or -1 for off; got {self.rand_augment}")
        for option, value in (("--mixup", self.mixup), ("--cutmix", self.cutmix),
                              ("--rand-augment-std", self.rand_augment_std),
                              ("--random-erasing", self.random_erasing),
                              ("--label-smoothing", self.label_smoothing)):
            if value < 0:
                raise ValueError(f"{option} must be >= 0, got {value}")

    def resolved(self) -> "TrainConfig":
        """This config with its local paths absolute (:func:`absolute_spec`)."""
        return _resolved(self, ("shards", "manifest", "out", "val", "teacher_weights", "finetune"))

    def model_overrides(self) -> dict:
        return {k: v for k, v in dict(img_size=self.img_size, patch_size=self.patch_size,
                                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                                      drop_path_rate=self.drop_path).items() if v is not None}

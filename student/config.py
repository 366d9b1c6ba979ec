"""What ``deitpipe train-student`` does: one frozen dataclass, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, replace

from deitpipe.shards.specs import absolute_spec


def resolved_paths(config, fields: tuple[str, ...]):
    """``config`` with the named path fields made absolute (:func:`absolute_spec`)."""
    return replace(config, **{f: absolute_spec(getattr(config, f)) for f in fields})


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
        keep_checkpoints: how many of the latest epoch checkpoints to keep.
        progress: show a progress bar.
        launcher: "local" (this process, no Ray), "torchrun" (under ``torchrun``) or "ray"
            (Ray Train workers).
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
    launcher: str = "ray"

    def __post_init__(self) -> None:
        for option, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                   ("--num-workers", self.num_workers, 1),
                                   ("--loader-workers", self.loader_workers, 0),
                                   ("--keep-checkpoints", self.keep_checkpoints, 1)):
            if value is not None and value < low:
                raise ValueError(f"{option} must be >= {low}, got {value}")
        if self.launcher not in ("local", "torchrun", "ray"):
            raise ValueError(f"--launcher must be local, torchrun or ray, got {self.launcher!r}")
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
        for option, value in (("--random-erasing", self.random_erasing), ("--mixup-switch", self.mixup_switch),
                              ("--label-smoothing", self.label_smoothing)):
            if not 0 <= value <= 1:
                raise ValueError(f"{option} is a probability in [0, 1], got {value}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"--stop-after-steps must be >= 1, got {self.stop_after_steps}")

    def resolved(self) -> "TrainConfig":
        """This config with its local paths absolute (:func:`absolute_spec`)."""
        return resolved_paths(self, ("shards", "manifest", "out", "val", "teacher_weights", "finetune"))

    def model_overrides(self) -> dict:
        return {k: v for k, v in dict(img_size=self.img_size, patch_size=self.patch_size,
                                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                                      drop_path_rate=self.drop_path).items() if v is not None}

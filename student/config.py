"""What ``deitpipe train-student`` does: one frozen dataclass, checked when built.

Each field is declared once, with its default, its help text and its allowed values
(:func:`~deitpipe.common.options.option`, which the teacher's config shares and this module
re-exports); the command line's options are made from these declarations
(``pipeline/options.py``), and :func:`~deitpipe.common.options.check_options` validates them for
every caller alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deitpipe.common.options import check_options, option, option_name
from deitpipe.shards.specs import absolute_spec

__all__ = ["MODEL_FIELDS", "TrainConfig", "check_options", "option", "option_name", "resolved_paths"]


def resolved_paths(config, names: tuple[str, ...]):
    """``config`` with the named path fields made absolute (:func:`absolute_spec`)."""
    return replace(config, **{n: absolute_spec(getattr(config, n)) for n in names})


MODEL_FIELDS = ("model", "img_size", "patch_size", "embed_dim", "depth", "num_heads")


@dataclass(frozen=True)
class TrainConfig:
    """What ``deitpipe train-student`` does; each field's help text says what it means."""

    shards: str | tuple[str, ...] = option(
        "shards-out", "label-teacher output directory, or a brace pattern of its shards (local, s3://, http(s)://, "
        "pipe:). Give it more than once to train on several sets labelled by the same teacher (e.g. a labelled "
        "set and an unlabelled one): every epoch mixes them.", multiple=True)
    manifest: str | None = option(None, "The shards' manifest.json (path or URL) when it is not beside them, "
                                  "as with pipe: commands.")
    out: str = option("student-out", "Run directory (local, or s3://bucket/prefix).")
    val: str | None = option(None, "Held-out data evaluated each epoch: 'digits:val', an ImageFolder, or shards.")
    model: str = option("deit_tiny_distilled_patch16_224",
                        "Student variant: deit_{tiny,small,base}[_distilled]_patch16_{224,384}.")
    img_size: int | None = option(None, "Override the input size (e.g. 32 for digits).", low=8)
    patch_size: int | None = option(None, "Override the patch size (e.g. 4 for 32 px).", low=1)
    embed_dim: int | None = option(None, "Override the width.", low=1)
    depth: int | None = option(None, "Override the number of blocks.", low=1)
    num_heads: int | None = option(None, "Override the attention heads.", low=1)
    drop_path: float = option(0.1, "Stochastic depth rate.", low=0, high=1, open_high=True)
    epochs: int = option(300, "Epochs.", low=1)
    batch_size: int = option(64, "Batch size per worker.", low=1)
    epoch_repeats: float = option(1.0, "Passes over the label set an epoch (timm's --epoch-repeats), each with "
                                  "its own order and views: a small set trains as many steps an epoch as a "
                                  "larger one.", low=0, open_low=True)
    lr: float = option(5e-4, "Learning rate for a global batch of 512 (scaled linearly).", low=0, open_low=True)
    weight_decay: float = option(0.05, "AdamW weight decay (not on norms, biases, tokens, position embedding).",
                                 low=0)
    warmup_epochs: float | None = option(None, "Linear warmup epochs before the cosine schedule (default: 5, or a "
                                         "tenth of --epochs when less).", low=0)
    min_lr: float = option(1e-5, "Final learning rate of the cosine.", low=0)
    grad_clip: float | None = option(None, "Clip the gradient norm to this value.", low=0, open_low=True)
    ema_decay: float | None = option(None, "Keep an EMA of the weights with this decay (e.g. 0.99996); student.pt "
                                     "is then the EMA.", low=0, high=1, open_low=True, open_high=True)
    distillation: str = option("hard", "Distillation token's target: none, soft (KL at --tau) or hard (teacher "
                               "argmax).", choices=("none", "soft", "hard"))
    alpha: float = option(0.5, "Weight of the distillation loss.", low=0, high=1)
    tau: float = option(1.0, "Soft distillation temperature.", low=0, open_low=True)
    teacher_labels: str | None = option(None, "views: replay stored views (default when the shards have them); "
                                        "global: fresh crops with the global label (fixed teacher).",
                                        choices=("views", "global"))
    min_scale: float = option(0.08, "Smallest area of fresh random crops (--teacher-labels global, --distillation "
                              "none).", low=0, high=1, open_low=True)
    rand_augment: float | None = option(9, "RandAugment level 0..10 on timm's scale (DeiT's rand-m9); -1 switches "
                                        "it off. Off by default on shards that store their augmentation; given "
                                        "there, it adds to the stored one, which the teacher did not see.",
                                        low=0, high=10, off=-1)
    rand_augment_std: float = option(0.5, "Noise of the RandAugment level per op (timm's mstd; DeiT 0.5).", low=0)
    random_erasing: float = option(0.25, "Random erasing probability (0 by default on shards that store their "
                                   "augmentation; more there breaks consistency).", low=0, high=1)
    mixup: float = option(0.8, "Mixup alpha; 0 off (by default on shards that store their augmentation; more "
                          "there breaks consistency).", low=0)
    cutmix: float = option(1.0, "CutMix alpha; 0 off (by default on shards that store their augmentation).", low=0)
    mixup_switch: float = option(0.5, "Probability of CutMix when both are on.", low=0, high=1)
    label_smoothing: float = option(0.1, "Label smoothing on the class head.", low=0, high=1, open_high=True)
    online_teacher: str | None = option(None, "Run this torchvision teacher live on each batch (the paper's method) "
                                        "instead of stored labels.")
    teacher_weights: str | None = option(None, "Weights of --online-teacher.")
    loader: str | None = option(None, "Where views are decoded, cut and augmented: cpu (DataLoader processes) or "
                                "gpu (batched on the training device, JPEG shards; others are cut in the "
                                "processes). Default: gpu on a GPU, else cpu.", choices=("cpu", "gpu"))
    launcher: str = option("ray", "local: this process, no Ray; torchrun: one process per rank under 'torchrun "
                           "--nproc-per-node N -m deitpipe train-student --launcher torchrun ...'; ray: Ray Train "
                           "workers.", choices=("local", "torchrun", "ray"))
    num_workers: int = option(1, "Ray Train workers (one per GPU); torchrun sets its own, local runs one.", low=1)
    device: str = option("auto", "Where the workers train: auto (the GPU where the workers have one, else the "
                         "CPU), cpu (gloo), or cuda (NCCL; an error where there is none).",
                         choices=("auto", "cpu", "cuda"))
    use_gpu: bool = option(False, "Same as --device cuda.")
    cpus_per_worker: int | None = option(None, "CPUs per worker (default: all / workers).", low=1)
    loader_workers: int | None = option(None, "DataLoader processes per worker (default: none on CPUs, the "
                                        "worker's CPUs - 1 with a GPU).", low=0)
    ray_address: str | None = option(None, "Join this Ray cluster; default: a local Ray.")
    compile: bool = option(False, "torch.compile the student.")
    channels_last: bool = option(False, "channels-last memory format.")
    seed: int = option(0, "Seed of data order, views and initialisation.")
    resume: bool = option(True, "Continue from the last checkpoint in --out.", flag="--resume/--no-resume")
    overwrite: bool = option(False, "Replace the run in --out (deitpipe's own files only; others stay).")
    finetune: str | None = option(None, "Start from this checkpoint (e.g. 224 weights with --img-size 384).")
    keep_checkpoints: int = option(2, "Latest epoch checkpoints kept (each holds the optimizer state).", low=1)
    stop_after_steps: int | None = option(None, "Stop after this many steps in total (a later run resumes).", low=1)
    progress: bool = option(True, "No progress bar.", flag="--no-progress")

    def __post_init__(self) -> None:
        if isinstance(self.shards, list):  # as a config.json holds several sets
            object.__setattr__(self, "shards", tuple(self.shards))
        check_options(self)
        if not self.shard_sets():
            raise ValueError("--shards names no shard set")
        if self.manifest and len(self.shard_sets()) > 1:
            raise ValueError("--manifest goes with one --shards; with several sets each manifest must lie beside "
                             "its shards")
        if self.use_gpu:
            if self.device == "cpu":
                raise ValueError("--use-gpu and --device cpu contradict each other; pass one")
            object.__setattr__(self, "device", "cuda")
        if self.warmup_epochs is None:  # DeiT's 5, or a tenth of a shorter run
            object.__setattr__(self, "warmup_epochs", min(5.0, self.epochs / 10))
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs must be in [0, --epochs={self.epochs}], got {self.warmup_epochs}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"--batch-size must be even with mixup/cutmix (timm pairs each sample with its mirror "
                             f"in the batch), got {self.batch_size}; choose an even size or --mixup 0 --cutmix 0")
        if self.online_teacher and self.distillation == "none":
            raise ValueError("--online-teacher needs --distillation soft or hard")
        if self.teacher_weights and not self.online_teacher:
            raise ValueError("--teacher-weights goes with --online-teacher NAME")

    def resolved(self) -> TrainConfig:
        """This config with its local paths absolute (:func:`absolute_spec`)."""
        config = resolved_paths(self, ("manifest", "out", "val", "teacher_weights", "finetune"))
        shards = tuple(absolute_spec(s) for s in self.shard_sets())
        return replace(config, shards=shards[0] if len(shards) == 1 else shards)

    def shard_sets(self) -> tuple[str, ...]:
        """``shards`` as a tuple of one or more shard sets."""
        return (self.shards,) if isinstance(self.shards, str) else tuple(self.shards)

    def model_overrides(self) -> dict:
        return {k: v for k, v in dict(img_size=self.img_size, patch_size=self.patch_size,
                                      embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                                      drop_path_rate=self.drop_path).items() if v is not None}

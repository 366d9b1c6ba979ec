"""Run configuration: one frozen dataclass per stage, checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from deitpipe.shards.specs import absolute_spec
from deitpipe.student.config import TrainConfig, check_options, option, resolved_paths

__all__ = ["DemoConfig", "LabelConfig", "TrainConfig", "absolute_spec"]

# Fields that do not change what a stage writes: a rerun may change them freely.
_LABEL_RUNTIME_FIELDS = frozenset({"out", "batch_size", "ray_address", "strict", "overwrite",
                                   "num_actors", "device", "progress", "max_pixels", "launcher"})


@dataclass(frozen=True)
class LabelConfig:
    """What ``deitpipe label-teacher`` does; each field's help text says what it means."""

    data: str = option("digits", "Input: 'digits' or 'cluttered-digits' (embedded; ':train' / ':val' for a "
                       "split), an ImageFolder directory, or WebDataset tars as a brace pattern (local, pipe: or "
                       "s3://).")
    out: str = option("shards-out", "Output directory for shards and manifest.json (local, or s3://bucket/prefix).")
    teacher: str = option("regnet_y_16gf", "torchvision classification model name.")
    teacher_weights: str | None = option(None, "Local weights file (state dict or checkpoint); default: "
                                         "torchvision's weights from the torch hub cache.")
    num_classes: int | None = option(None, "Teacher head size (default: from the weights).", low=2)
    unlabeled: bool = option(False, "Label every input by the teacher alone, storing no true label: a folder of "
                             "images at any depth (class folders or not), tars with or without cls members. The "
                             "embedded ':unlabeled-K' sets need it.")
    views: int = option(8, "Random RandomResizedCrop views per image, stored besides the global view; 0 = global "
                        "only.", low=0)
    min_scale: float = option(0.08, "Smallest crop area of a random view, as a fraction of the image.", low=0,
                              high=1, open_low=True)
    topk: int = option(10, "Stored top-k of each view's softmax.", low=1)
    full_softmax: bool = option(False, "Also store each view's full softmax (float16).")
    shard_size: int = option(1000, "Samples per shard.", low=1)
    batch_size: int = option(64, "Views per teacher forward pass.", low=1)
    seed: int = option(0, "Seed of the view boxes.")
    image_size: int = option(32, "Size embedded digits are rendered at.", low=8)
    resize: int | None = option(None, "Override the teacher's resize (short side).", low=1)
    crop: int | None = option(None, "Override the teacher's input (crop) size.", low=1)
    view_size: int | None = option(None, "Cut each view at this side (the student's input size, e.g. 32) and give "
                                   "the teacher that view resized to its own input: the teacher labels the "
                                   "student's exact pixels. Default: views at the teacher's crop.", low=1)
    interpolation: str | None = option(None, "Override the teacher's interpolation.",
                                       choices=("bilinear", "bicubic", "nearest"))
    rand_augment: float | None = option(None, "Store a RandAugment with each random view at this level 0..10 "
                                        "(DeiT's 9; train-student's option): the teacher labels the augmented "
                                        "view. Default off; -1 also switches it off.", low=0, high=10, off=-1)
    rand_augment_std: float = option(0.5, "Noise of the stored RandAugment's level per op (DeiT 0.5).", low=0)
    random_erasing: float = option(0.0, "Store random erasing with this probability (DeiT's 0.25).", low=0, high=1)
    mixup: float = option(0.0, "Store mixup with a partner of the same shard, this Beta alpha (DeiT's 0.8); 0 off.",
                          low=0)
    cutmix: float = option(0.0, "Store CutMix, this Beta alpha (DeiT's 1.0); 0 off.", low=0)
    mixup_switch: float = option(0.5, "Probability of CutMix when both are stored.", low=0, high=1)
    launcher: str | None = option(None, "Who runs the teacher: 'local' (this process; threads decode ahead of one "
                                  "teacher; no Ray start-up, and no Ray needed) or 'ray' (Ray Data: decode tasks and "
                                  "one teacher actor per GPU, on this machine or a cluster). Default: ray with "
                                  "--ray-address or several GPUs here, else local. Both write the same shards.",
                                  choices=("local", "ray"))
    ray_address: str | None = option(None, "Join this Ray cluster ('auto' or host:port) with --launcher ray; "
                                     "default: a local Ray.")
    num_actors: int | None = option(None, "Teacher actors (default: one per GPU, or one).", low=1)
    device: str = option("auto", "Where the teacher runs.", choices=("auto", "cuda", "cpu"))
    strict: bool = option(False, "Fail on the first undecodable input instead of skipping it.")
    max_pixels: int | None = option(None, "Skip images with more pixels as decompression bombs (default: Pillow's "
                                    "limit, about 89 Mpx).", low=1)
    overwrite: bool = option(False, "Replace shards made with other arguments (deitpipe's own files only; others "
                             "stay).")
    progress: bool = option(True, "No progress bar.", flag="--no-progress")

    def __post_init__(self) -> None:
        check_options(self)

    def resolved(self) -> "LabelConfig":
        """This config with its local paths absolute (:func:`absolute_spec`)."""
        return resolved_paths(self, ("data", "out", "teacher_weights"))

    def fingerprint(self) -> dict:
        """The fields that decide the output's content, as stored in the manifest."""
        out = {k: v for k, v in asdict(self).items() if k not in _LABEL_RUNTIME_FIELDS}
        # Settings of an augmentation that is off change nothing: they are not part of it.
        if self.rand_augment is None:
            out.pop("rand_augment_std")
        if not (self.mixup > 0 and self.cutmix > 0):
            out.pop("mixup_switch")
        return out


# The demo's settings per embedded data set, for the options left unset (None).
# teacher_min_scale: the teacher's smallest training crop (None: train-teacher's default, 0.25 at
# 32 px); on cluttered digits a quarter of the canvas often misses the digit.
# img_size: the teacher's input side. On cluttered digits it reads the 32 px canvas at 64 px:
# resnet18's stride-32 stages then end on 2x2 cells instead of one. student_size: the student's
# input side; label-teacher cuts every view at it (--view-size) and the teacher labels that view
# resized to its own input, so a stored view is exactly the pixels the student trains on.
# The student (BENCHMARKS.md, "A student that learns"): 32 px in 8 px patches (16 tokens), 192
# wide, 4 blocks, AdamW at 3e-4 without DeiT's ImageNet regularisers, which stop a ViT on 1,200
# images from fitting at all.
DEMO_DEFAULTS = {
    "cluttered-digits": {"teacher_epochs": 10, "student_epochs": 30, "views": 8, "min_scale": 0.35, "patch_size": 8,
                         "teacher_min_scale": 0.5, "img_size": 64, "student_size": 32},
    "digits": {"teacher_epochs": 10, "student_epochs": 20, "views": 8, "min_scale": 0.35, "patch_size": 8,
               "teacher_min_scale": None, "img_size": 32, "student_size": 32},
}


def _demo_default(field: str) -> str:
    return ", ".join(f"{v[field]:g} on {k}" for k, v in DEMO_DEFAULTS.items())


@dataclass(frozen=True)
class DemoConfig:
    """What ``deitpipe demo`` does; defaults finish within about ten minutes on two CPU cores."""

    out: str = option("demo-out", "Directory for every stage's output.")
    data: str = option("cluttered-digits", "Embedded data set: 'cluttered-digits' (each digit at a random place "
                       "on a 32 px canvas of fragments of others) or 'digits' (the digit alone).",
                       choices=tuple(DEMO_DEFAULTS))
    seed: int = option(0, "Seed of split, teacher, views and students.")
    image_size: int = 32  # images are rendered at this size (library-only)
    teacher: str = option("resnet18", "torchvision model trained as the teacher.")
    teacher_epochs: int | None = option(None, f"Teacher epochs (default {_demo_default('teacher_epochs')}).", low=1)
    student_epochs: int | None = option(None, f"Epochs of each student (default {_demo_default('student_epochs')}).",
                                        low=1)
    views: int | None = option(None, f"Stored views per image (default {_demo_default('views')}).", low=1)
    min_scale: float | None = option(None, f"Smallest view area, as a fraction (default {_demo_default('min_scale')}"
                                     "); the DeiT default 0.08 leaves a 32 px image a few pixels.", low=0, high=1,
                                     open_low=True)
    labels_per_class: int = option(2, "Few-label rows: K labelled training images a class, alone and with the "
                                   "teacher's labels on the rest ('NAME:labeled-K', 'NAME:unlabeled-K'); 0 skips them.",
                                   low=0, high=100)
    patch_size: int | None = None  # the student's patch side in px (library-only; default per data set)
    student_size: int | None = None  # the student's input side in px (library-only; default per data set)
    teacher_min_scale: float | None = None  # the teacher's smallest crop area (library-only; default per data set)
    img_size: int | None = None  # the teacher's input side in px (library-only; default per data set)
    progress: bool = option(True, "No progress bars.", flag="--no-progress")

    def __post_init__(self) -> None:
        check_options(self)
        for name, value in DEMO_DEFAULTS[self.data].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

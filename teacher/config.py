"""What ``deitpipe train-teacher`` does: one frozen dataclass, each field declared once.

Its fields carry their command-line help (``common.options.option``); this module imports
nothing heavy, so the command line starts without torch, and torchvision is imported where a
check or a property needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from deitpipe.common.options import option
from deitpipe.shards.format.conventions import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, LARGE_INPUT, eval_resize

if TYPE_CHECKING:
    from deitpipe.teacher.preprocess import Preprocessing

OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.03, "weight_decay": 5e-4},
                      "adamw": {"lr": 1e-3, "weight_decay": 0.05}}
SGD_MOMENTUM = 0.9  # with Nesterov


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Options of ``deitpipe train-teacher``; None means "derived from the other options"."""

    data: str = option("digits:train", "Training data: ImageFolder, WebDataset tars, or an embedded set "
                       "('digits', 'digits:train', 'cluttered-digits', 'cluttered-digits:train').")
    out: str = option("teacher.pt", "Weights file to write; its JSON sidecar (preprocessing, classes) goes beside it.")
    teacher: str = option("regnet_y_400mf", "torchvision classification model name.")
    teacher_weights: str | None = option(None, "Start from these weights (fine-tune); the head is replaced when the "
                                         "class count differs.")
    num_classes: int | None = option(None, "Head size (default: the data's class count).")
    epochs: int = option(30, "Epochs.")
    batch_size: int = option(64, "Batch size.")
    lr: float | None = option(None, "Peak learning rate (default " + ", ".join(
        f"{v['lr']:g} for {k}" for k, v in OPTIMIZER_DEFAULTS.items()) + ").")
    optimizer: str = option("sgd", f"Optimizer (sgd: momentum {SGD_MOMENTUM}, Nesterov).",
                            choices=tuple(OPTIMIZER_DEFAULTS))
    weight_decay: float | None = option(None, "Weight decay (default " + ", ".join(
        f"{v['weight_decay']:g} for {k}" for k, v in OPTIMIZER_DEFAULTS.items()) + ").")
    label_smoothing: float = option(0.1, "Label smoothing.")
    img_size: int = option(32, "Teacher input size (training and eval crop).")
    resize: int | None = option(None, f"Eval resize of the short side (default: img-size below {LARGE_INPUT} px, "
                                "else img-size/0.875).")
    min_scale: float | None = option(None, f"RandomResizedCrop lower area bound (default 0.25 below {LARGE_INPUT} px, "
                                     "else 0.08).")
    val: str | None = option(None, "Held-out data evaluated each epoch, e.g. 'digits:val' or 'cluttered-digits:val'.")
    image_size: int = option(32, "Size embedded digits are rendered at.")
    num_workers: int = option(0, "DataLoader processes (0 is fastest for small in-memory images).")
    device: str = option("auto", "auto, cpu or cuda[:N].")
    seed: int = option(0, "Seed of initialisation, data order and augmentation.")
    progress: bool = option(True, "No progress bar.", flag="--no-progress")
    # Library-only fields (no command-line option).
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB, in [0, 1] units
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # of training crops and eval resize

    def __post_init__(self) -> None:
        for name in ("mean", "std"):  # click and JSON give lists; store canonical tuples
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"--{name} needs 3 values (R G B), got {len(value)}")
            object.__setattr__(self, name, value)
        for field, ok, need in _checks(self):
            if not ok:
                value = getattr(self, field)
                raise ValueError(f"--{field.replace('_', '-')} must be {need}, got {value!r}")
        from deitpipe.teacher.preprocess import check_teacher_name  # torchvision, only when checked

        check_teacher_name(self.teacher)
        if self.teacher_weights is not None and not Path(self.teacher_weights).is_file():
            raise ValueError(f"--teacher-weights {self.teacher_weights} is not a file")

    @property
    def crop_scale(self) -> tuple[float, float]:
        """RandomResizedCrop's area range."""
        # ImageNet's 8% from LARGE_INPUT (128 px) on; below it (digits, CIFAR-sized data) a crop
        # of 8% is a few pixels of stroke, so crops keep at least 25%.
        default = 0.08 if self.img_size >= LARGE_INPUT else 0.25
        return (default if self.min_scale is None else self.min_scale, 1.0)

    @property
    def preprocessing(self) -> Preprocessing:
        """The eval preprocessing the trained teacher expects, as written to the sidecar."""
        resize = eval_resize(self.img_size) if self.resize is None else self.resize
        from deitpipe.teacher.preprocess import Preprocessing  # torchvision, only when asked

        return Preprocessing(resize=resize, crop=self.img_size, mean=self.mean, std=self.std,
                             interpolation=self.interpolation)

    def resolved(self) -> TeacherTrainConfig:
        """A copy with every None derived from the other options (num_classes excepted)."""
        lr, wd = (OPTIMIZER_DEFAULTS[self.optimizer][k] for k in ("lr", "weight_decay"))
        return replace(self, lr=lr if self.lr is None else self.lr,
                       weight_decay=wd if self.weight_decay is None else self.weight_decay,
                       resize=self.preprocessing.resize, min_scale=self.crop_scale[0])


def _checks(c: TeacherTrainConfig) -> list[tuple[str, bool, str]]:
    """``(field, valid, what it must be)`` for every option with a simple range."""
    return [
        ("data", bool(c.data), "an input (digits:train, a folder or tars)"),
        ("out", bool(c.out) and Path(c.out).suffix != ".json",
         "a weights file such as teacher.pt (not .json: that is the sidecar's name)"),
        ("num_classes", c.num_classes is None or c.num_classes >= 2, ">= 2"),
        ("epochs", c.epochs >= 1, ">= 1"),
        ("batch_size", c.batch_size >= 1, ">= 1"),
        ("lr", c.lr is None or c.lr > 0, "> 0"),
        ("optimizer", c.optimizer in OPTIMIZER_DEFAULTS, f"one of {', '.join(OPTIMIZER_DEFAULTS)}"),
        ("weight_decay", c.weight_decay is None or c.weight_decay >= 0, ">= 0"),
        ("label_smoothing", 0 <= c.label_smoothing < 1, "in [0, 1)"),
        ("img_size", c.img_size >= 8, ">= 8"),
        ("resize", c.resize is None or c.resize >= c.img_size, f">= --img-size ({c.img_size})"),
        ("std", min(c.std) > 0, "positive"),
        ("interpolation", c.interpolation in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
        ("min_scale", c.min_scale is None or 0 < c.min_scale <= 1, "in (0, 1]"),
        ("seed", c.seed >= 0, ">= 0"),
        ("num_workers", c.num_workers >= 0, ">= 0"),
        ("image_size", c.image_size >= 8, ">= 8"),
    ]

"""Run configuration: one frozen dataclass per stage, checked when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from deitpipe.shards.specs import absolute_spec
from deitpipe.student.config import TrainConfig, resolved_paths

__all__ = ["LabelConfig", "TrainConfig", "absolute_spec"]

# Fields that do not change what a stage writes: a rerun may change them freely.
_LABEL_RUNTIME_FIELDS = frozenset({"out", "batch_size", "ray_address", "strict", "overwrite",
                                   "num_actors", "device", "progress", "max_pixels"})


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
        max_pixels: images with more pixels are skipped as decompression bombs (None: Pillow's
            limit, ``PIL.Image.MAX_IMAGE_PIXELS``).
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
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
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
        return resolved_paths(self, ("data", "out", "teacher_weights"))

    def fingerprint(self) -> dict:
        """The fields that decide the output's content, as stored in the manifest."""
        return {k: v for k, v in asdict(self).items() if k not in _LABEL_RUNTIME_FIELDS}

"""Image conventions both stages share: ImageNet statistics and the eval crop rule.

Plain constants and arithmetic, with no heavy imports, so configurations and the command line
can use them without loading torch.
"""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# From this side on an image is treated as ImageNet-like: its eval view keeps a border (see
# eval_crop_pct) and random crops may shrink to 8% of its area. Below it (digits, CIFAR-sized
# data) the object fills the frame.
LARGE_INPUT = 128
# Resize interpolations a teacher's preprocessing may name.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def eval_crop_pct(img_size: int) -> float:
    """Fraction of the resized image that the eval centre crop keeps, for an input side.

    ImageNet-sized inputs (``img_size >= LARGE_INPUT``) follow the DeiT/timm convention: resize
    the short side to ``img_size / 0.875`` and centre crop ``img_size``, cutting a border that
    on photos is mostly background. Small images (digits, CIFAR) have no border to spare: the
    object fills the frame, and at 32 px a 12.5% border cuts strokes, so they are resized to the
    crop and nothing is cut.

    Args:
        img_size: side of the square input the model sees.

    Returns:
        0.875 for ``img_size >= LARGE_INPUT`` (128), else 1.0.
    """
    return 0.875 if img_size >= LARGE_INPUT else 1.0


def eval_resize(crop: int, crop_pct: float | None = None) -> int:
    """Short side to resize to before an eval centre crop of ``crop``: ``round(crop / crop_pct)``.

    Args:
        crop: side of the centre crop (the model's input size).
        crop_pct: kept fraction; None for :func:`eval_crop_pct` of ``crop``.

    Returns:
        The resize side, e.g. 256 for a 224 crop, 32 for a 32 crop.
    """
    if crop_pct is None:
        crop_pct = eval_crop_pct(crop)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(round(crop / crop_pct))

"""View geometry as pure functions: random crop boxes, the global box, the view replayed per epoch.

Every random draw is a function of ``(seed, key, view index)`` (and the epoch for replay) through
``numpy.random.SeedSequence``, so a view can be recomputed anywhere, in any order, on any worker,
and ``--views 4`` yields exactly the first four views of ``--views 8``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from deitpipe.shards.format.schema import BOX_DTYPE, FLIP_DTYPE

# Distinct stream tags so the replay choice never reuses the numbers that drew a box.
_REPLAY_TAG = 0x5EB1A7


def key_hash(key: str) -> int:
    """Stable 32-bit hash of a sample key (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(key.encode("utf-8"))


def _random_resized_crop(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with a numpy generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: whole image, with the aspect ratio clamped into the allowed range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    return (height - h) // 2, (width - w) // 2, h, w


def random_view_boxes(
    *,
    seed: int,
    key: str,
    num_views: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the random views of one image, RandomResizedCrop style, plus a flip per view.

    View ``i`` uses its own generator seeded by ``SeedSequence([seed, crc32(key), i])``, so it does
    not depend on ``num_views`` or on the other views.

    Args:
        seed: Run seed.
        key: Sample key (``schema.sample_key``), hashed with CRC-32.
        num_views: Number of random views V (0 gives empty arrays).
        height: Image height in decoded pixels.
        width: Image width in decoded pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_p: Probability of a horizontal flip.

    Returns:
        ``(boxes, flips)``: (V, 4) int32 ``(top, left, height, width)`` inside the image with
        height, width >= 1, and (V,) uint8 flips.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    if num_views < 0:
        raise ValueError(f"num_views must be >= 0, got {num_views}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale {scale} and ratio {ratio} must be positive (low, high) pairs")
    boxes = np.zeros((num_views, 4), dtype=BOX_DTYPE)
    flips = np.zeros((num_views,), dtype=FLIP_DTYPE)
    khash = key_hash(key)
    for i in range(num_views):
        rng = np.random.default_rng(np.random.SeedSequence([seed, khash, i]))
        boxes[i] = _random_resized_crop(rng, height=height, width=width, scale=scale, ratio=ratio)
        flips[i] = rng.random() < flip_p
    return boxes, flips


def _resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """Output size of torchvision ``Resize(resize)`` (shorter side to ``resize``)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _centre_span(size: int, new_size: int, crop: int) -> tuple[int, int]:
    """Start and length in source pixels of CenterCrop(crop) along one axis of a resized image."""
    if crop >= new_size:
        # torchvision pads here; a box cannot pad, so the view takes the whole axis.
        return 0, size
    start = int(round((new_size - crop) / 2.0))  # torchvision's centre crop offset
    factor = size / new_size
    src_len = min(max(int(round(crop * factor)), 1), size)
    src_start = min(max(int(round(start * factor)), 0), size - src_len)
    return src_start, src_len


def global_box(*, height: int, width: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """The source-pixel box seen by the eval transform ``Resize(resize)`` then ``CenterCrop(crop)``.

    ``cut_view(img, global_box(...), False, crop)`` approximates that transform (it differs only
    by sub-pixel rounding at the box edges). When ``crop`` exceeds a resized side, torchvision
    pads with zeros; the box instead spans that whole side and the cut stretches it to ``crop``.

    Args:
        height: Image height in decoded pixels.
        width: Image width in decoded pixels.
        resize: Target of the shorter side.
        crop: Side of the square centre crop.

    Returns:
        ``(top, left, height, width)`` inside the image, height and width >= 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    if resize < 1 or crop < 1:
        raise ValueError(f"resize and crop must be >= 1, got resize={resize}, crop={crop}")
    new_h, new_w = _resized_size(height, width, resize)
    top, h = _centre_span(height, max(new_h, 1), crop)
    left, w = _centre_span(width, max(new_w, 1), crop)
    return top, left, h, w


def epoch_view_index(*, seed: int, epoch: int, key: str, num_views: int) -> int:
    """The stored view a sample replays in an epoch: uniform over the random views 1..V.

    Args:
        seed: Student run seed.
        epoch: Epoch number.
        key: Sample key.
        num_views: Number of random views V stored per sample.

    Returns:
        A row index in ``[1, V]``, or 0 (the global view) when ``V == 0``.
    """
    if num_views <= 0:
        return 0
    ss = np.random.SeedSequence([seed, epoch, key_hash(key), _REPLAY_TAG])
    # One 32-bit word of the seed sequence; modulo bias is < V / 2**32.
    return 1 + int(ss.generate_state(1, dtype=np.uint32)[0]) % num_views

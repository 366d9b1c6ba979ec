"""Decoding stored image bytes and cutting views: the one implementation both stages use.

Stage one (the teacher) and stage two (the student) both call :func:`decode_image` on the stored
original bytes and :func:`cut_view` with a stored box and flip. Keeping a single function means a
view the teacher labelled is the same pixels the student is trained on, up to the resolution each
one resizes to. The conventions both stages share about images live here too: the ImageNet
normalisation and the eval view's crop rule (:func:`eval_crop_pct`, :func:`eval_resize`).

Box convention: ``(top, left, height, width)`` in pixels of the decoded image, i.e. after the
EXIF orientation has been applied and the image converted to RGB.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# The shared image conventions, defined without heavy imports there and re-exported here.
from deitpipe.shards.format.conventions import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    LARGE_INPUT,
    eval_crop_pct,
    eval_resize,
)

Box = Sequence[int]  # (top, left, height, width)

# Leading magic bytes -> type; WebP is checked separately (RIFF....WEBP).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ImageDecodeError(ValueError):
    """Stored bytes are not a decodable image; the message is a short reason for the manifest."""


def sniff_image_type(data: bytes) -> str | None:
    """Return the real image type from the leading magic bytes.

    Args:
        data: File content (only the first 16 bytes are looked at).

    Returns:
        One of ``schema.IMAGE_EXTENSIONS`` (jpg, png, webp, gif, bmp, tiff), or None when the
        bytes match none of them.
    """
    head = bytes(data[:16])
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


# Pillow's own limit, read once: decode_image never changes the process-wide setting.
DEFAULT_MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image with the EXIF orientation applied.

    Args:
        data: Image file content of any type Pillow reads (the extension is irrelevant).
        max_pixels: Largest width x height accepted; the size is read from the header and checked
            before any pixel data is decoded, so a small file declaring a huge image (a
            decompression bomb) costs nothing. None: no limit of ours (Pillow still refuses
            images over twice its ``Image.MAX_IMAGE_PIXELS``).

    Returns:
        An RGB ``PIL.Image.Image`` whose pixels are loaded.

    Raises:
        ImageDecodeError: "zero bytes", "not an image", "truncated: ...", "decompression bomb: ..."
            or "unsupported mode ..." for anything that cannot be decoded.
    """
    if len(data) == 0:
        raise ImageDecodeError("zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None  # the warning, under -W error
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"truncated: {exc}") from None
    _check_pixels(img, max_pixels)
    try:
        img.load()  # raises on truncated data: Pillow decodes lazily otherwise
        img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated: {exc}") from None
    _check_pixels(img, max_pixels)  # a frame loaded may be larger than the header said
    return _to_rgb(img)


def _check_pixels(img: Image.Image, max_pixels: int | None) -> None:
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(f"decompression bomb: {width}x{height} pixels exceeds --max-pixels {max_pixels}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _deep_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK (incl. Adobe inverted), YCbCr, ...
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported mode {mode}: {exc}") from None


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8-bit RGB by scaling, not clipping (Pillow clips)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0  # 0..65535 -> 0..255
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _size_pair(size: int | Sequence[int]) -> list[int]:
    if isinstance(size, int):
        return [size, size]  # square, as RandomResizedCrop; resized_crop would treat an int as the short side
    h, w = size
    return [int(h), int(w)]


def _interpolation(name: str | InterpolationMode) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation {name!r} is not one of {sorted(_INTERPOLATIONS)}") from None


def _as_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    if img.mode != "RGB":
        raise ValueError(f"cut_view expects an RGB image (use decode_image), got mode {img.mode}")
    return F.pil_to_tensor(img)  # (3, H, W) uint8


def _check_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    top, left, h, w = (int(v) for v in box)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(
            f"view box (top={top}, left={left}, height={h}, width={w}) is not inside the "
            f"{height}x{width} image; boxes are in decoded (EXIF-transposed) pixels"
        )
    return top, left, h, w


def cut_view(
    img: Image.Image | torch.Tensor,
    box: Box,
    flip: bool,
    size: int | tuple[int, int],
    *,
    interpolation: str | InterpolationMode = "bilinear",
) -> torch.Tensor:
    """Cut one view: crop the box, resize it to ``size`` with antialiasing, optionally flip.

    This is the single pixel path of both stages (teacher labelling and student replay).

    Args:
        img: RGB image from :func:`decode_image`, or its (3, H, W) uint8 tensor.
        box: ``(top, left, height, width)`` in source pixels; must lie inside the image.
        flip: Mirror the view horizontally after resizing.
        size: Output side (square) or ``(height, width)``.
        interpolation: "bilinear" (default), "bicubic", "nearest" or "nearest-exact".

    Returns:
        A (3, H, W) uint8 tensor.
    """
    t = _as_tensor(img)
    top, left, h, w = _check_box(box, t.shape[-2], t.shape[-1])
    out = F.resized_crop(
        t, top, left, h, w, _size_pair(size), interpolation=_interpolation(interpolation), antialias=True
    )
    return F.horizontal_flip(out) if flip else out


def cut_views(
    img: Image.Image | torch.Tensor,
    boxes: np.ndarray | Sequence[Box],
    flips: np.ndarray | Sequence[bool],
    size: int | tuple[int, int],
    *,
    interpolation: str | InterpolationMode = "bilinear",
) -> torch.Tensor:
    """Cut several views of one image with :func:`cut_view`.

    Args:
        img: RGB image from :func:`decode_image`, or its (3, H, W) uint8 tensor.
        boxes: (N, 4) boxes ``(top, left, height, width)``.
        flips: (N,) horizontal flips.
        size: Output side (square) or ``(height, width)``.
        interpolation: As in :func:`cut_view`.

    Returns:
        An (N, 3, H, W) uint8 tensor.
    """
    if len(boxes) != len(flips):
        raise ValueError(f"cut_views got {len(boxes)} boxes but {len(flips)} flips")
    t = _as_tensor(img)
    out_h, out_w = _size_pair(size)
    if len(boxes) == 0:
        return torch.empty((0, 3, out_h, out_w), dtype=torch.uint8)
    views = [cut_view(t, b, bool(f), size, interpolation=interpolation) for b, f in zip(boxes, flips)]
    return torch.stack(views)  # (N, 3, H, W)


def upsample_views(views: torch.Tensor, size: int) -> torch.Tensor:
    """Views cut at the student's size, resized to the teacher's input: (N, 3, s, s) uint8 ->
    (N, 3, size, size) uint8, bilinear (half-pixel centres), rounded. A pure function of the
    student's pixels, so the teacher labels exactly what the student will see, only larger."""
    if views.shape[-1] == size and views.shape[-2] == size:
        return views
    up = torch.nn.functional.interpolate(views.float(), size=(size, size), mode="bilinear", align_corners=False)
    return up.round_().clamp_(0, 255).to(torch.uint8)


def storable_image(data: bytes, img: Image.Image) -> tuple[bytes, str]:
    """Bytes and extension to store for an input: the original when its type is in the schema.

    Inputs Pillow reads but the schema does not list (PPM, ICO, ...) are stored as lossless PNG of
    the decoded RGB image, which has the same pixel grid the boxes refer to.

    Args:
        data: Original file content.
        img: ``decode_image(data)``.

    Returns:
        ``(bytes, ext)`` with ``ext`` in ``schema.IMAGE_EXTENSIONS``.
    """
    kind = sniff_image_type(data)
    if kind is not None:
        return data, kind
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"

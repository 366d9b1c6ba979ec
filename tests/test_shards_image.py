"""Decoding traps and the shared view cutter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from deitpipe.shards.format.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    cut_view,
    cut_views,
    decode_image,
    eval_crop_pct,
    eval_resize,
    sniff_image_type,
    storable_image,
)
from deitpipe.shards.format.views import global_box


@pytest.mark.parametrize(
    "name, kind",
    [("rgb_jpeg", "jpg"), ("rgb_png", "png"), ("webp", "webp"), ("gif", "gif"), ("bmp", "bmp"),
     ("tiff", "tiff"), ("cmyk_jpeg", "jpg"), ("ppm", None), ("text", None), ("zero", None)],
)
def test_sniff_by_content(image_bytes, name, kind):
    assert sniff_image_type(image_bytes[name]) == kind


@pytest.mark.parametrize(
    "name", ["rgb_jpeg", "rgb_png", "webp", "gif", "bmp", "tiff", "ppm", "cmyk_jpeg", "grey_jpeg",
             "rgba_png", "palette_png", "grey16_png", "exif_jpeg"],
)
def test_decodes_to_rgb(image_bytes, name):
    img = decode_image(image_bytes[name])
    assert img.mode == "RGB"
    assert np.asarray(img).shape[2] == 3


def test_cmyk_colour_survives(image_bytes):
    # CMYK (0, 255, 255, 0) is pure red.
    px = np.asarray(decode_image(image_bytes["cmyk_jpeg"])).reshape(-1, 3).mean(0)
    assert px[0] > 200 and px[1] < 60 and px[2] < 60


def test_alpha_composited_on_white(image_bytes):
    arr = np.asarray(decode_image(image_bytes["rgba_png"]))
    assert (arr[:, :8] == 255).all()  # transparent half -> white
    assert (arr[:, 8:] == [255, 0, 0]).all()
    pal = np.asarray(decode_image(image_bytes["palette_png"]))
    assert (pal[:, :5] == 255).all() and (pal[:, 5:] == [255, 0, 0]).all()


def test_16bit_scaled_not_clipped(image_bytes):
    grey = np.asarray(decode_image(image_bytes["grey16_png"]))[0, :, 0]
    assert grey.tolist() == [0, 128, 255, 4]


def test_exif_rotation_applied_and_boxes_in_transposed_pixels(image_bytes):
    img = decode_image(image_bytes["exif_jpeg"])  # stored 40x20 (w x h), displayed 20x40
    assert img.size == (20, 40)
    top = cut_view(img, (0, 0, 20, 20), False, 8).float().mean((1, 2))
    bottom = cut_view(img, (20, 0, 20, 20), False, 8).float().mean((1, 2))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "name, reason", [("truncated_jpeg", "truncated"), ("zero", "zero bytes"), ("text", "not an image")]
)
def test_undecodable_raise_with_reason(image_bytes, name, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(image_bytes[name])


def test_storable_image_keeps_known_types_and_converts_others(image_bytes):
    data = image_bytes["rgb_jpeg"]
    assert storable_image(data, decode_image(data)) == (data, "jpg")
    ppm = image_bytes["ppm"]
    out, ext = storable_image(ppm, decode_image(ppm))
    assert ext == "png"
    assert np.array_equal(np.asarray(decode_image(out)), np.asarray(decode_image(ppm)))


def test_cut_view_shape_flip_and_identity(smooth_image):
    img = smooth_image(24, 32)
    full = cut_view(img, (0, 0, 24, 32), False, (24, 32))
    assert full.dtype == torch.uint8 and full.shape == (3, 24, 32)
    assert torch.equal(full, torch.from_numpy(np.array(img)).permute(2, 0, 1))  # no resampling
    flipped = cut_view(img, (0, 0, 24, 32), True, (24, 32))
    assert torch.equal(flipped, full.flip(-1))
    assert cut_view(img, (2, 3, 10, 20), False, 16).shape == (3, 16, 16)  # int size is square


def test_cut_view_rejects_box_outside_image(smooth_image):
    with pytest.raises(ValueError, match="not inside"):
        cut_view(smooth_image(10, 10), (5, 5, 6, 5), False, 8)


def test_cut_views_stacks_cut_view(smooth_image):
    img = smooth_image(40, 50)
    boxes = np.array([[0, 0, 40, 50], [5, 10, 20, 30], [1, 1, 3, 3]], np.int32)
    flips = np.array([0, 1, 0], np.uint8)
    out = cut_views(img, boxes, flips, 12, interpolation="bicubic")
    assert out.shape == (3, 3, 12, 12) and out.dtype == torch.uint8
    for i in range(3):
        assert torch.equal(out[i], cut_view(img, boxes[i], bool(flips[i]), 12, interpolation="bicubic"))
    assert cut_views(img, np.zeros((0, 4)), np.zeros(0), 12).shape == (0, 3, 12, 12)


@pytest.mark.parametrize("hw", [(300, 400), (400, 300), (256, 256), (97, 333)])
def test_global_box_matches_resize_centercrop(hw, smooth_image):
    img = smooth_image(*hw)
    box = global_box(height=hw[0], width=hw[1], resize=160, crop=128)
    ours = cut_view(img, box, False, 128).float()
    ref = v2.Compose([v2.PILToTensor(), v2.Resize(160, antialias=True), v2.CenterCrop(128)])(img).float()
    assert ours.shape == ref.shape == (3, 128, 128)
    err = (ours - ref).abs().mean()
    assert err < 1.5  # of 255: sub-pixel offsets at the box edges only
    top, left, h, w = box
    shift = max(h // 10, 1)
    off = cut_view(img, (top + shift, left, h - shift, w), False, 128).float()
    assert (off - ref).abs().mean() > 2 * err  # the comparison would notice a wrong box


def _png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte 1-bit PNG whose header declares ``width`` x ``height``; its pixel data is cut
    short, so decoding it (rather than refusing it from its header) would fail as "truncated"."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header():
    import warnings

    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    bomb = _png_declaring(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 8000x6000 pixels exceeds --max-pixels 1000000$"):
        decode_image(_png_declaring(8000, 6000), max_pixels=1_000_000)
    for max_pixels in (1_000_000, None):  # over twice Pillow's limit: Pillow's own error, as an ImageDecodeError
        with pytest.raises(ImageDecodeError, match="^decompression bomb: .*400000000 pixels"):
            decode_image(bomb, max_pixels=max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Between Pillow's limit and twice it Pillow only warns; the default limit refuses it.
        with pytest.raises(ImageDecodeError, match="decompression bomb: 10000x10000 pixels exceeds --max-pixels"):
            decode_image(_png_declaring(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning raised as an exception is converted too
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            decode_image(_png_declaring(10000, 10000), max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == limit  # the process-wide setting is untouched


def test_max_pixels_is_inclusive_and_leaves_other_images_alone(image_bytes):
    assert decode_image(image_bytes["rgb_png"], max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageDecodeError, match="64x48 pixels exceeds --max-pixels 3071"):
        decode_image(image_bytes["rgb_png"], max_pixels=64 * 48 - 1)
    with pytest.raises(ImageDecodeError, match="^truncated"):
        decode_image(_png_declaring(100, 100))  # small enough: decoded, and its data is cut short


@pytest.mark.parametrize(
    ("img_size", "crop_pct", "resize"),
    [(8, 1.0, 8), (32, 1.0, 32), (127, 1.0, 127), (128, 0.875, 146), (224, 0.875, 256),
     (384, 0.875, 439)],
)
def test_eval_crop_keeps_a_border_only_on_imagenet_sized_inputs(img_size, crop_pct, resize):
    assert eval_crop_pct(img_size) == crop_pct
    assert eval_resize(img_size) == resize == round(img_size / crop_pct)


def test_eval_resize_with_an_explicit_fraction():
    assert eval_resize(32, 0.875) == 37 and eval_resize(224, 1.0) == 224
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_pct"):
            eval_resize(224, bad)


def test_imagenet_normalisation_is_defined_once():
    from deitpipe.student import data as student_data
    from deitpipe.teacher import preprocess

    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    for module in (student_data, preprocess):
        assert module.IMAGENET_MEAN is IMAGENET_MEAN and module.IMAGENET_STD is IMAGENET_STD

"""Decoding traps and the shared view cutter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from deitpipe.shards.image import (
    ImageDecodeError,
    cut_view,
    cut_views,
    decode_image,
    sniff_image_type,
    storable_image,
)
from deitpipe.shards.views import global_box


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

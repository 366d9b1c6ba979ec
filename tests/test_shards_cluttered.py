"""Cluttered digits: the construction, its named specs, and its ImageFolder build."""

import io

import numpy as np
import pytest
from PIL import Image

from deitpipe.pipeline.config import LabelConfig
from deitpipe.shards.inputs import cluttered, read_bytes, resolve_source
from deitpipe.shards.inputs.cluttered import CANVAS, DIGIT, cluttered_canvas, upscale_all
from deitpipe.shards.inputs.embedded import _digits, digits_image_folder, digits_split, render_digit
from deitpipe.shards.specs import NAMED_DATA, absolute_spec
from deitpipe.student.heldout import eval_items


@pytest.fixture(scope="module")
def digits():
    return upscale_all(_digits()[0])


def test_canvas_is_a_pure_function_of_seed_and_index(digits):
    a, box = cluttered_canvas(digits, 7, seed=3)
    b, box_b = cluttered_canvas(digits, 7, seed=3)
    assert a.shape == (CANVAS, CANVAS) and a.dtype == np.uint8
    assert np.array_equal(a, b) and box == box_b
    assert not np.array_equal(a, cluttered_canvas(digits, 7, seed=4)[0])
    assert not np.array_equal(a, cluttered_canvas(digits, 8, seed=3)[0])


def test_digit_lies_whole_inside_the_canvas_and_is_drawn_there(digits):
    positions = set()
    for index in range(0, 1797, 37):
        canvas, (left, top, right, bottom) = cluttered_canvas(digits, index)
        assert 0 <= left and 0 <= top and right <= CANVAS and bottom <= CANVAS
        assert (right - left, bottom - top) == (DIGIT, DIGIT)
        # Pixels combine by maximum: the digit's own strokes survive every fragment.
        assert (canvas[top:bottom, left:right] >= digits[index]).all()
        positions.add((left, top))
    assert len(positions) > 20  # translated, not centred


def test_canvas_has_clutter_outside_the_digit(digits):
    outside = []
    for index in range(50):
        canvas, (left, top, right, bottom) = cluttered_canvas(digits, index)
        mask = np.ones_like(canvas, dtype=bool)
        mask[top:bottom, left:right] = False
        outside.append(int((canvas[mask] > 64).sum()))
    assert np.mean(outside) > 20 and min(outside) >= 0


def test_fragments_never_come_from_the_digit_itself():
    # With only two digits, every fragment of canvas 0 must be cut from digit 1.
    two = np.stack([np.zeros((DIGIT, DIGIT), np.uint8), np.full((DIGIT, DIGIT), 200, np.uint8)])
    canvas, _ = cluttered_canvas(two, 0)
    assert canvas.max() == 200
    canvas, _ = cluttered_canvas(two[::-1].copy(), 1)
    assert canvas.max() == 200


@pytest.mark.parametrize("spec, count", [("cluttered-digits", 1797), ("cluttered-digits:train", 1200),
                                         ("cluttered-digits:val", 597)])
def test_named_specs_resolve_with_balanced_labels(spec, count):
    source = resolve_source(spec)
    assert len(source.candidates) == count and source.class_names == [str(i) for i in range(10)]
    labels = np.bincount([c.label for c in source.candidates], minlength=10)
    assert labels.min() >= 0.9 * count / 10 and labels.max() <= 1.1 * count / 10
    first = source.candidates[0]
    assert first.kind == "cluttered-digits" and first.path.startswith("cluttered-digits/")
    img = Image.open(io.BytesIO(read_bytes(first)))
    assert img.size == (CANVAS, CANVAS) and img.mode == "RGB"
    assert read_bytes(first) != render_digit(int(first.ref), image_size=CANVAS)


def test_splits_match_the_digits_split_and_each_image_is_the_same_in_both():
    train = resolve_source("cluttered-digits:train", seed=1)
    val = resolve_source("cluttered-digits:val", seed=1)
    assert [int(c.ref) for c in train.candidates] == list(digits_split(seed=1)[0])
    assert [int(c.ref) for c in val.candidates] == list(digits_split(seed=1)[1])
    whole = {c.ref: c for c in resolve_source("cluttered-digits").candidates}
    c = val.candidates[3]
    assert read_bytes(c) == read_bytes(whole[c.ref])  # the image does not depend on the split


def test_render_size_follows_image_size():
    c = resolve_source("cluttered-digits:val", image_size=48).candidates[0]
    assert Image.open(io.BytesIO(read_bytes(c))).size == (48, 48)


def test_every_command_takes_the_named_specs():
    for spec in ("cluttered-digits", "cluttered-digits:train", "cluttered-digits:val"):
        assert spec in NAMED_DATA and absolute_spec(spec) == spec
        assert LabelConfig(data=spec).resolved().data == spec
    items, names = eval_items("cluttered-digits:val")
    assert len(items) == 597 and names == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="cluttered-digits"):
        resolve_source("cluttered-digits:test")


def test_image_folder_of_each_kind(tmp_path):
    out = digits_image_folder(tmp_path / "d", seed=0, kind="cluttered-digits")
    files = sorted((out / "val").rglob("*.png"))
    assert len(files) == 597 and len(list((out / "train").rglob("*.png"))) == 1200
    index = int(files[0].stem)
    canvas, _ = cluttered_canvas(upscale_all(_digits()[0]), index)
    assert np.array_equal(np.asarray(Image.open(files[0]))[..., 0], canvas)
    # Asking the same folder for plain digits rebuilds it as plain digits.
    digits_image_folder(tmp_path / "d", seed=0, kind="digits")
    assert files[0].read_bytes() == render_digit(index, image_size=32)
    with pytest.raises(ValueError, match="kind"):
        digits_image_folder(tmp_path / "e", kind="mnist")


def test_held_out_digits_under_several_clutter_seeds(tmp_path):
    out = digits_image_folder(tmp_path / "d", seed=0, kind="cluttered-digits", val_renders=3)
    val = sorted((out / "val").rglob("*.png"))
    assert len(val) == 3 * 597 and len(list((out / "train").rglob("*.png"))) == 1200
    train_digits = {int(p.stem) for p in (out / "train").rglob("*.png")}
    held = {int(p.stem.split("-")[0]) for p in val}
    assert len(held) == 597 and not held & train_digits  # never a training digit
    index = min(held)
    label = next(p.parent.name for p in val if p.stem == f"{index:06d}")
    renders = [np.asarray(Image.open(out / "val" / label / name))[..., 0]
               for name in (f"{index:06d}.png", f"{index:06d}-c1.png", f"{index:06d}-c2.png")]
    digits = upscale_all(_digits()[0])
    assert np.array_equal(renders[0], cluttered_canvas(digits, index)[0])  # the named set's render
    assert np.array_equal(renders[2], cluttered_canvas(digits, index, seed=2)[0])
    assert not np.array_equal(renders[0], renders[1]) and not np.array_equal(renders[1], renders[2])
    assert {p.parent.name for p in val if p.stem.startswith(f"{index:06d}")} == {label}
    with pytest.raises(ValueError, match="val_renders"):
        digits_image_folder(tmp_path / "e", kind="digits", val_renders=2)


def test_module_constants_fit_together():
    assert cluttered.FRAGMENT <= cluttered.DIGIT < cluttered.CANVAS

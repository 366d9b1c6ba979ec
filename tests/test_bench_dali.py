"""bench/dali_replay.py: DALI's views of stored boxes and flips against ``cut_view``, on the CPU decoder.

Skipped without ``nvidia.dali``. Bounds, per view, in mean absolute difference of uint8 levels
from ``cut_view`` on the Pillow-decoded image: DALI's "cpu" decoder equals Pillow's decode bit
for bit, so what remains is the rounding of the two antialiased resizes, measured at 0.17 on
average and at most 0.25 for a view (every pixel within 3 levels) when ``image_slice`` decodes the
box, and at most 0.46 for a view when ``fn.resize`` reads the box out of the whole image (it
samples a pixel or so beyond the box at the edges, up to 11 levels there). A missing flip costs
a view 15 or more, and the box read with x and y swapped 5 or more.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from deitpipe.shards.format.image import cut_view, decode_image  # noqa: E402
from deitpipe.shards.format.views import random_view_boxes  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"
SIZE = 40  # views of 40 px: the small images below are both shrunk and enlarged
MEAN_BOUND = 1.0  # per view; measured at most 0.25 (image_slice) and 0.46 (resize_roi)
PIXEL_BOUND = 4  # image_slice, every pixel; measured at most 3


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))  # the bench imports its sibling benchutil, as when run as a script
        spec = importlib.util.spec_from_file_location("bench_dali_replay", BENCH / "dali_replay.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def views(bench):
    """Five images (landscape, portrait, square, an odd size, an EXIF-rotated one), each with its
    whole-image box (flipped) and four random views; with ``cut_view``'s reference views."""
    from benchutil import photo_jpeg

    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(rng, height=h, width=w, quality=90) for h, w in [(48, 64), (80, 36), (57, 57), (120, 90)]]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x70, displayed 70x40: boxes are in displayed pixels
    buf = io.BytesIO()
    decode_image(photo_jpeg(rng, height=40, width=70)).save(buf, "JPEG", quality=90, exif=exif)
    jpegs.append(buf.getvalue())
    data, boxes, flips, reference = [], [], [], []
    for k, jpeg in enumerate(jpegs):
        img = decode_image(jpeg)
        drawn, drawn_flips = random_view_boxes(seed=3, key=str(k), num_views=4, height=img.height, width=img.width)
        for box, flip in [((0, 0, img.height, img.width), True), *zip(drawn.tolist(), drawn_flips.tolist())]:
            data.append(jpeg)
            boxes.append(tuple(box))
            flips.append(bool(flip))
            reference.append(cut_view(img, box, bool(flip), SIZE))
    assert 0 < sum(flips) < len(flips)
    return data, np.asarray(boxes, dtype=np.int32), np.asarray(flips), torch.stack(reference)


def per_view_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs().float().mean((1, 2, 3))


@pytest.mark.parametrize("roi_decode", [True, False], ids=["image_slice", "resize_roi"])
def test_views_match_cut_view(bench, views, roi_decode):
    data, boxes, flips, reference = views
    out = bench.dali_decode_and_cut(data, boxes, flips, size=SIZE, device="cpu", batch_size=8, num_threads=1,
                                    roi_decode=roi_decode)  # 25 views: the last batch holds one
    assert out.shape == (len(data), 3, SIZE, SIZE) and out.dtype == torch.uint8 and out.device.type == "cpu"
    diff = per_view_difference(out, reference)
    assert diff.max() <= MEAN_BOUND, f"views {torch.nonzero(diff > MEAN_BOUND).flatten().tolist()}: {diff.max():.3f}"
    if roi_decode:
        assert (out.int() - reference.int()).abs().max() <= PIXEL_BOUND


def test_the_bound_catches_a_missing_flip_and_swapped_axes(bench, views):
    data, boxes, flips, reference = views
    unflipped = bench.dali_decode_and_cut(data, boxes, ~flips, size=SIZE, device="cpu", batch_size=8, num_threads=1)
    assert per_view_difference(unflipped, reference).min() > 5 * MEAN_BOUND
    # x and y swapped, where that moves the box and keeps it inside the image
    swapped = boxes[:, [1, 0, 3, 2]]
    heights_widths = [decode_image(d).size[::-1] for d in data]
    keep = [i for i, ((h, w), s, b) in enumerate(zip(heights_widths, swapped, boxes))
            if s[0] + s[2] <= h and s[1] + s[3] <= w and tuple(s) != tuple(b)]
    assert len(keep) >= 3
    out = bench.dali_decode_and_cut([data[i] for i in keep], swapped[keep], flips[keep], size=SIZE, device="cpu",
                                    batch_size=8, num_threads=1)
    assert per_view_difference(out, reference[keep]).min() > 2 * MEAN_BOUND


def test_boxes_become_absolute_wh_windows(bench):
    anchors, shapes = bench.dali_windows(np.array([[5, 7, 20, 30], [0, 0, 1, 2]], dtype=np.int32))
    assert anchors.tolist() == [[7, 5], [0, 0]] and shapes.tolist() == [[30, 20], [2, 1]]
    assert anchors.dtype == shapes.dtype == np.int32  # integers: DALI reads them as pixels, not fractions
    anchors, _ = bench.dali_windows(torch.tensor([[1, 2, 3, 4]]))
    assert anchors.tolist() == [[2, 1]]
    fractions, negative, empty = np.array([[0.1, 0.2, 0.5, 0.5]]), np.array([[0, -1, 4, 4]]), np.array([[0, 0, 0, 4]])
    for bad in (fractions, negative, empty, np.zeros((2, 3), dtype=int)):
        with pytest.raises(ValueError):
            bench.dali_windows(bad)


@pytest.mark.slow
def test_quick_run_prints_rates_and_differences():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "dali_replay.py"), "--quick", "--device", "cpu"],
                          cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    paths = [(row["path"], row.get("variant")) for row in rows]
    assert paths == [("torchvision", None), ("dali", "image_slice"), ("dali", "resize_roi")]
    assert rows[0]["mean_abs_diff_vs_cut_view"] < 0.01  # on the CPU decode_and_cut is cut_view's arithmetic
    for row in rows[1:]:
        assert row["images_per_s"] > 0 and row["ratio_dali_over_torchvision"] > 0
        assert row["mean_abs_diff_vs_cut_view"] < MEAN_BOUND and row["mean_abs_diff_vs_decode_and_cut"] < MEAN_BOUND

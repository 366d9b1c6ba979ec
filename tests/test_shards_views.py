"""View geometry: random boxes, the global box, replay choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deitpipe.shards.format.views import epoch_view_index, global_box, random_view_boxes


def _inside(boxes: np.ndarray, height: int, width: int) -> bool:
    t, l, h, w = boxes.T
    return bool((h >= 1).all() and (w >= 1).all() and (t >= 0).all() and (l >= 0).all()
                and (t + h <= height).all() and (l + w <= width).all())


def test_boxes_deterministic_typed_and_key_dependent():
    a = random_view_boxes(seed=3, key="s000000001", num_views=6, height=80, width=120)
    b = random_view_boxes(seed=3, key="s000000001", num_views=6, height=80, width=120)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].dtype == np.int32 and a[0].shape == (6, 4)
    assert a[1].dtype == np.uint8 and a[1].shape == (6,)
    other_key = random_view_boxes(seed=3, key="s000000002", num_views=6, height=80, width=120)
    other_seed = random_view_boxes(seed=4, key="s000000001", num_views=6, height=80, width=120)
    assert not np.array_equal(a[0], other_key[0])
    assert not np.array_equal(a[0], other_seed[0])


def test_fewer_views_are_a_prefix():
    four = random_view_boxes(seed=0, key="k", num_views=4, height=50, width=70)
    eight = random_view_boxes(seed=0, key="k", num_views=8, height=50, width=70)
    assert np.array_equal(four[0], eight[0][:4]) and np.array_equal(four[1], eight[1][:4])
    empty = random_view_boxes(seed=0, key="k", num_views=0, height=50, width=70)
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


@pytest.mark.parametrize("hw", [(1, 1), (1, 300), (300, 1), (2, 3), (17, 500), (224, 224), (1000, 37)])
def test_boxes_inside_image(hw):
    boxes, _ = random_view_boxes(seed=1, key="x", num_views=64, height=hw[0], width=hw[1])
    assert _inside(boxes, *hw)


def test_fallback_is_centre_crop_with_clamped_ratio():
    # No crop of 90-100% area with aspect 3..4 fits a 100x10 image: all ten attempts fail.
    boxes, _ = random_view_boxes(seed=0, key="x", num_views=3, height=100, width=10, scale=(0.9, 1.0), ratio=(3, 4))
    assert (boxes == [48, 0, 3, 10]).all()


def test_distribution_matches_torchvision_random_resized_crop():
    h, w, n = 90, 160, 3000
    boxes, flips = random_view_boxes(seed=0, key="dist", num_views=n, height=h, width=w)
    torch.manual_seed(0)
    ref = np.array([_tv_params(h, w) for _ in range(n)])
    for arr in (boxes, ref):
        assert _inside(arr, h, w)
    area, ref_area = boxes[:, 2] * boxes[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert abs(area.mean() - ref_area.mean()) < 0.03
    aspect, ref_aspect = np.log(boxes[:, 3] / boxes[:, 2]), np.log(ref[:, 3] / ref[:, 2])
    assert abs(aspect.mean() - ref_aspect.mean()) < 0.03 and abs(aspect.std() - ref_aspect.std()) < 0.03
    assert 0.45 < flips.mean() < 0.55


def _tv_params(h: int, w: int) -> tuple[int, int, int, int]:
    from torchvision.transforms import RandomResizedCrop

    return RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])


@pytest.mark.parametrize(
    "hw, resize, crop, expected",
    [
        ((480, 640), 256, 224, (30, 109, 420, 420)),  # hand-computed: scale 480/256 = 1.875
        ((256, 256), 256, 224, (16, 16, 224, 224)),
        ((100, 100), 64, 80, (0, 0, 100, 100)),  # crop > resize: whole image, no padding
        ((1, 1), 256, 224, (0, 0, 1, 1)),
        ((3, 500), 256, 224, (0, 249, 3, 3)),  # 21221 of 42666 resized px -> 248.7 source px
    ],
)
def test_global_box_geometry(hw, resize, crop, expected):
    assert global_box(height=hw[0], width=hw[1], resize=resize, crop=crop) == expected


def test_epoch_view_index_range_and_variety():
    picks = [epoch_view_index(seed=0, epoch=e, key="s000000007", num_views=5) for e in range(200)]
    assert set(picks) == {1, 2, 3, 4, 5}
    assert picks == [epoch_view_index(seed=0, epoch=e, key="s000000007", num_views=5) for e in range(200)]
    other = [epoch_view_index(seed=0, epoch=e, key="s000000008", num_views=5) for e in range(200)]
    assert picks != other
    assert epoch_view_index(seed=0, epoch=3, key="k", num_views=0) == 0
    assert epoch_view_index(seed=0, epoch=3, key="k", num_views=1) == 1

"""The replay loader: per-rank batches, epoch coverage, view fidelity, label modes."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from conftest import write_shard_set
from deitpipe.shards.image import cut_view, decode_image
from deitpipe.shards.reader import expand_urls, iter_samples
from deitpipe.shards.views import epoch_view_index
from deitpipe.student.data import Augment, EvalImages, RandAugment, ShardReplay, eval_items, steps_per_epoch

PLAIN = Augment(rand_augment=None, random_erasing=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture()
def shards(tmp_path):
    out = tmp_path / "shards"
    write_shard_set(out, num_samples=23, shard_size=4, views=3, topk=3, num_classes=10)
    return out


def _replay(shards, **kw):
    base = dict(urls=expand_urls(str(shards)), num_classes=10, num_views=3, teacher_labels="views",
                img_size=16, batch_size=4, steps=steps_per_epoch(23, batch_size=4, world_size=1),
                augment=PLAIN)
    return ShardReplay(**{**base, **kw})


def _labels_and_keys(ds):
    return [int(x["label"]) for x in ds]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("loader_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_full_batches(shards, world, loader_workers):
    steps = steps_per_epoch(23, batch_size=4, world_size=world)
    counts = []
    for rank in range(world):
        ds = _replay(shards, rank=rank, world_size=world, steps=steps)
        ds.set_epoch(1)
        batches = list(DataLoader(ds, batch_size=4, num_workers=loader_workers))
        assert all(b["image"].shape == (4, 3, 16, 16) for b in batches)
        counts.append(len(batches))
    assert counts == [steps] * world


def test_an_epoch_covers_the_data_and_epochs_differ(shards):
    ds = _replay(shards, steps=5, batch_size=4)  # 20 of 23 samples, each at most once
    seen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen.append([round(float(x["image"].sum()), 3) for x in ds])
    for images in seen:
        assert len(images) == 20
    assert seen[0] != seen[1]


def test_replayed_view_is_the_stored_view_and_its_label(shards):
    ds = _replay(shards, img_size=24)
    ds.set_epoch(3)
    sample = next(iter_samples(expand_urls(str(shards))[0]))
    ex = ds.example(sample)
    v = epoch_view_index(seed=0, epoch=3, key=sample["key"], num_views=3)
    assert v >= 1
    want = cut_view(decode_image(sample["image"]), tuple(sample["box"][v]), bool(sample["flip"][v]), 24)
    torch.testing.assert_close(ex["image"], want.float() / 255)
    assert int(ex["teacher_hard"]) == int(sample["hard"][v])
    assert int(ex["teacher"].argmax()) == int(sample["topk"][v][0])
    assert abs(float(ex["teacher"].sum()) - 1) < 1e-5


def test_views_over_epochs_use_every_stored_view(shards):
    ds = _replay(shards)
    sample = next(iter_samples(expand_urls(str(shards))[0]))
    used = collections.Counter(epoch_view_index(seed=0, epoch=e, key=sample["key"], num_views=3)
                               for e in range(60))
    assert set(used) == {1, 2, 3}
    ds.set_epoch(0)
    assert ds.example(sample)["image"].shape == (3, 16, 16)


def test_global_mode_uses_the_global_label_under_fresh_crops(shards):
    ds = _replay(shards, teacher_labels="global", img_size=16)
    sample = next(iter_samples(expand_urls(str(shards))[0]))
    crops = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        ex = ds.example(sample)
        assert int(ex["teacher_hard"]) == int(sample["hard"][0])
        crops.append(ex["image"])
    assert not all(torch.equal(crops[0], c) for c in crops[1:])
    none = _replay(shards, teacher_labels="none").example(sample)
    assert "teacher" not in none and int(none["label"]) == sample["label"]


def test_bad_modes_are_one_line_errors(shards):
    with pytest.raises(ValueError, match="--teacher-labels must be one of"):
        _replay(shards, teacher_labels="live")
    with pytest.raises(ValueError, match="label-teacher --views N"):
        _replay(shards, num_views=0)


def test_eval_items_from_shards_carry_the_teacher_global_label(shards):
    items, _ = eval_items(str(shards))
    assert len(items) == 23
    samples = list(iter_samples(expand_urls(str(shards))))
    assert [i[2] for i in items] == [int(s["hard"][0]) for s in samples]
    ds = EvalImages(items, img_size=16, crop_pct=1.0)
    x = ds[0]
    assert x["image"].shape == (3, 16, 16) and int(x["teacher_hard"]) == items[0][2]
    assert np.isfinite(x["image"].numpy()).all()


class _RotateOnly(RandAugment):
    """RandAugment over Rotate alone, recording the angle of every applied op."""

    _AUGMENTATION_SPACE = {"Rotate": RandAugment._AUGMENTATION_SPACE["Rotate"]}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.angles = []

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, **kw):
        self.angles.append(magnitude)
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, **kw)


def test_rand_augment_level_is_on_timms_scale():
    # timm's rand-m9 rotates by 0.9 of its 30 degree range; torchvision's magnitude=9 by 9 degrees.
    img = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    ra = _RotateOnly(magnitude=9, magnitude_std=0, p=1.0, fill=0)
    torch.manual_seed(0)
    out = ra(img)
    assert len(ra.angles) == 2 and all(abs(a) == pytest.approx(27.0) for a in ra.angles)
    from torchvision.transforms.v2 import functional as F

    want = img
    for a in ra.angles:
        want = F.rotate(want, a, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
    torch.testing.assert_close(out, want)


def test_rand_augment_level_noise_and_op_probability():
    img = torch.zeros((3, 8, 8), dtype=torch.uint8)
    ra = _RotateOnly(magnitude=9, magnitude_std=0.5, p=0.5)
    torch.manual_seed(1)
    for _ in range(2000):
        ra(img)
    levels = np.abs(ra.angles) / 3.0  # 30 degrees = level 10
    assert len(levels) / 4000 == pytest.approx(0.5, abs=0.03)  # each of 2 ops applied with p=0.5
    assert levels.mean() == pytest.approx(9.0, abs=0.05)
    assert levels.std() == pytest.approx(0.49, abs=0.04)  # N(9, 0.5) clipped at 10: sd 0.49
    assert levels.max() <= 10.0


def test_rand_augment_options_reach_the_transform():
    ops = Augment(rand_augment=7, rand_augment_std=0.0).build().transforms
    ra = next(op for op in ops if isinstance(op, RandAugment))
    assert (ra.level, ra.level_std, ra.ops) == (7.0, 0.0, 2)
    assert not any(isinstance(op, RandAugment) for op in Augment(rand_augment=None).build().transforms)
    with pytest.raises(ValueError, match="rand-augment"):
        RandAugment(magnitude=11)

"""The batched loader on shards that store each view's augmentation: the worker loader's pixels,
partners across batches, extra augmentation only when asked, and the teacher's stored labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import run_cli, write_digit_folder, write_teacher
from deitpipe.shards.format.augment import AugmentSpec, ViewRenderer
from deitpipe.shards.format.randaugment import BatchAugment, augment_generator
from deitpipe.shards.format.reader import expand_urls
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.student.gpu_replay import DeviceBatches, EncodedShardReplay, collate, prepare_batch
from deitpipe.student.gpu_stored import with_partners

SIZE, VIEWS, SAMPLES = 32, 4, 24
NO_EXTRA = BatchAugment(rand_augment=None, random_erasing=0.0)  # train-student's default on these shards


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Path, dict, Path]:
    """24 digits (22 JPEG, 2 PNG) labelled with 4 views, RandAugment, erasing, mixup and CutMix
    into two shards: (shard dir, its manifest's "augment", the teacher's weights)."""
    root = tmp_path_factory.mktemp("stored")
    data = root / "digits"
    for k, png in enumerate(sorted(write_digit_folder(root / "png", n=SAMPLES).rglob("*.png"))):
        img = Image.open(png).resize((40, 34))
        dst = data / png.parent.name / png.stem
        dst.parent.mkdir(parents=True, exist_ok=True)
        if k % 12 == 5:
            img.save(dst.with_suffix(".png"))  # cut in the worker
        else:
            img.save(dst.with_suffix(".jpg"), quality=95)  # cut by the batch step
    weights = write_teacher(root / "teacher.pt", side=SIZE)
    result = run_cli("label-teacher", "--data", data, "--out", root / "out", "--teacher", "resnet18",
                     "--teacher-weights", weights, "--views", VIEWS, "--rand-augment", 9, "--random-erasing", 0.5,
                     "--mixup", 0.8, "--cutmix", 1.0, "--shard-size", 12, "--device", "cpu", "--launcher", "local",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    augment = json.loads((root / "out" / "manifest.json").read_text())["augment"]
    return root / "out", augment, weights


def replay_kwargs(stored, batch_size: int) -> dict:
    out, augment, _ = stored
    return dict(urls=expand_urls(str(out)), num_classes=10, num_views=VIEWS, teacher_labels="views", img_size=SIZE,
                batch_size=batch_size, steps=SAMPLES // batch_size, stored_augment=augment)


class KeyedReplay(ShardReplay):
    """``ShardReplay`` whose examples also name their sample."""

    def replay(self, samples, views, emit):
        return [{**x, "key": s["key"]} for x, s in zip(super().replay(samples, views, emit), samples)]


def cpu_examples(stored, batch_size: int, epoch: int) -> list[dict]:
    ds = KeyedReplay(**replay_kwargs(stored, batch_size), augment=Augment(rand_augment=None, random_erasing=0.0))
    ds.set_epoch(epoch)
    return list(ds)


def gpu_batches(stored, batch_size: int, epoch: int, augment=NO_EXTRA) -> list[tuple[dict, dict]]:
    """(collated batch, prepared batch) pairs of one epoch on the CPU device."""
    ds = EncodedShardReplay(**replay_kwargs(stored, batch_size))
    ds.set_epoch(epoch)
    renderer = ViewRenderer(AugmentSpec.from_dict(stored[1]))
    out = []
    for step, batch in enumerate(DataLoader(ds, batch_size=batch_size, collate_fn=collate)):
        generator = augment_generator(seed=0, epoch=epoch, rank=0, step=step, device="cpu")
        out.append((batch, prepare_batch(batch, img_size=SIZE, device="cpu", augment=augment, generator=generator,
                                         renderer=renderer)))
    return out


def gpu_examples(batches: list[tuple[dict, dict]]) -> list[dict]:
    return [{"key": key, **{name: value[i] for name, value in prepared.items()}}
            for batch, prepared in batches for i, key in enumerate(batch["key"])]


def assert_same_pixels(a: torch.Tensor, b: torch.Tensor, std) -> None:
    """Normalised images equal up to the batched resize's rounding: few values off, each by a few levels."""
    levels = (a - b).abs() * torch.tensor(std)[:, None, None] * 255
    assert float(levels.max()) <= 3.01 and float((levels > 0.01).float().mean()) <= 0.01


@pytest.mark.parametrize("batch_size", [1, 3])
def test_gpu_loader_renders_the_cpu_loaders_views_across_batches(stored, batch_size):
    """Batch size 1 carries every partner in from another batch (PNGs among them); 3 splits some pairs."""
    carried = carried_png = 0
    for epoch in range(2):
        batches = gpu_batches(stored, batch_size, epoch)
        for batch, _ in batches:
            cut, records, partner = with_partners(batch)
            carried += len(cut["key"]) - len(batch["key"])
            carried_png += int((~cut["jpeg"][len(batch["key"]):]).sum())
        ours = sorted(gpu_examples(batches), key=lambda x: x["key"])
        ref = sorted(cpu_examples(stored, batch_size, epoch), key=lambda x: x["key"])
        assert [x["key"] for x in ours] == [x["key"] for x in ref] and len({x["key"] for x in ours}) == SAMPLES
        assert_same_pixels(torch.stack([x["image"] for x in ours]), torch.stack([x["image"] for x in ref]),
                           stored[1]["std"])
        for x, y in zip(ours, ref):
            for name in ("label", "teacher", "teacher_hard"):
                assert torch.equal(x[name], y[name]), (x["key"], name)
        assert sum(float(x["label"].max()) < 1 for x in ours) > SAMPLES // 2  # mixed views, lam-weighted labels
    assert carried >= (2 * SAMPLES if batch_size == 1 else 2)
    assert carried_png > 0 or batch_size > 1


def test_extra_augmentation_on_stored_shards_is_added_only_when_asked(stored):
    plain = gpu_batches(stored, 4, 0, augment=None)
    off = gpu_batches(stored, 4, 0)
    extra = gpu_batches(stored, 4, 0, augment=BatchAugment(rand_augment=9, random_erasing=1.0))
    for (_, a), (_, b), (_, c) in zip(plain, off, extra):
        assert torch.equal(a["image"], b["image"])
        for name in ("label", "teacher", "teacher_hard"):
            assert torch.equal(a[name], c[name])
        assert all(not torch.equal(x, y) for x, y in zip(a["image"], c["image"]))  # every view erased


def test_the_teacher_on_the_gpu_loaders_pixels_gives_the_stored_labels(stored):
    from deitpipe.teacher.predict import TeacherPredictor

    _, augment, weights = stored
    teacher = TeacherPredictor(name="resnet18", weights_path=weights, device="cpu")
    mean, std = (torch.tensor(augment[k])[None, :, None, None] for k in ("mean", "std"))
    agree = total = 0
    labels = set()
    for epoch in range(3):
        ds = EncodedShardReplay(**replay_kwargs(stored, 4))
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=4, collate_fn=collate)
        for batch in DeviceBatches(loader, img_size=SIZE, device="cpu", augment=NO_EXTRA, seed=0, epoch=epoch,
                                   rank=0, renderer=ViewRenderer(AugmentSpec.from_dict(augment))):
            pred = teacher.probs(batch["image"] * std + mean).argmax(1)
            agree += int((pred == batch["teacher_hard"]).sum())
            total += len(pred)
            labels.update(batch["teacher_hard"].tolist())
    assert total == 3 * SAMPLES and agree / total >= 0.99
    assert len(labels) > 1  # the teacher tells views apart: agreement is not one constant answer


def test_train_loader_hands_the_label_sets_renderer_to_the_batch_step(stored):
    from deitpipe.pipeline.train import shard_sets_info, stored_augment_defaults
    from deitpipe.student.config import TrainConfig
    from deitpipe.student.trainer import train_loader

    cfg = TrainConfig(shards=str(stored[0]), loader="gpu", batch_size=4, loader_workers=1)
    info = shard_sets_info(cfg.shard_sets())
    cfg = stored_augment_defaults(cfg, set(), stored=info["augment"])  # as train-student builds it: nothing extra
    loader = train_loader(cfg, info, "views", img_size=SIZE, epoch=1, rank=0, world=1, steps=SAMPLES // 4,
                          device=torch.device("cpu"))
    ours = torch.cat([batch["image"] for batch in loader])
    ref = torch.stack([x["image"] for x in cpu_examples(stored, 4, 1)])  # same order: the same iteration
    assert_same_pixels(ours, ref, stored[1]["std"])


def test_a_batch_with_records_and_no_renderer_is_refused(stored):
    ds = EncodedShardReplay(**replay_kwargs(stored, 2))
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert np.asarray(batch["mix_key"]).shape == (2,)
    with pytest.raises(ValueError, match="renderer"):
        prepare_batch(batch, img_size=SIZE, device="cpu", augment=NO_EXTRA, generator=None)

"""The batched replay path: worker reading, batched decode and cut against cut_view, EXIF, modes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from conftest import encode, make_sample
from deitpipe.shards.format import schema
from deitpipe.shards.format.image import ImageDecodeError, cut_view, decode_image, sniff_image_type
from deitpipe.shards.format.manifest import write_manifest
from deitpipe.shards.format.plan import plan_shards
from deitpipe.shards.format.reader import expand_urls, iter_samples
from deitpipe.shards.format.views import epoch_view_index, global_box, random_view_boxes
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.shards.inputs.embedded import render_digit
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.student.engine import MixupCutmix, train_one_epoch
from deitpipe.shards.format.randaugment import BatchAugment
from deitpipe.student.gpu_replay import (
    DeviceBatches,
    EncodedShardReplay,
    collate,
    decode_and_cut,
    jpeg_layout,
    prefetch,
)
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import create_student
from deitpipe.student.optim import build_optimizer

PLAIN = Augment(rand_augment=None, random_erasing=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
VIEWS = 3


def photo_jpeg(seed: int, height: int = 375, width: int = 500, *, quality: int = 90, **save) -> bytes:
    """A photo-like JPEG: colour waves, soft blobs and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    img = np.stack([128 + 60 * np.sin(2 * np.pi * (a * x + b * y + p)) for a, b, p in rng.uniform(-1, 1, (3, 3))], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 3) * (1, 1, 0.25) + (0, 0, 0.05)
        img += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
    img += rng.normal(0, 12, img.shape)
    return encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "JPEG", quality=quality, **save)


def with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.open(io.BytesIO(data)), "JPEG", quality=95, exif=exif)


def mixed_images() -> list[bytes]:
    """What a shard set holds: photos, one with EXIF orientation 6, greyscale, CMYK, PNG, digits."""
    small = photo_jpeg(5, 60, 80)
    return [photo_jpeg(0), photo_jpeg(1, 500, 375), with_orientation(photo_jpeg(2, 120, 90), 6),
            encode(Image.open(io.BytesIO(small)).convert("L"), "JPEG", quality=90),
            encode(Image.open(io.BytesIO(small)).convert("CMYK"), "JPEG", quality=90),
            encode(Image.open(io.BytesIO(small)), "PNG"), photo_jpeg(3, 90, 120, progressive=True),
            render_digit(7), encode(decode_image(render_digit(3)), "JPEG", quality=95)]


def write_image_shards(out, images: list[bytes], *, shard_size: int = 4, num_classes: int = 10) -> None:
    """conftest's shard set (``make_sample``'s teacher outputs) over these images, with real
    random view boxes and the global box in displayed pixels."""
    samples = []
    for i, data in enumerate(images):
        s = make_sample(i, views=VIEWS, num_classes=num_classes)
        img = decode_image(data)
        boxes, flips = random_view_boxes(seed=7, key=s["key"], num_views=VIEWS, height=img.height, width=img.width)
        side = min(img.height, img.width)
        g = np.asarray([global_box(height=img.height, width=img.width, resize=side, crop=side)], schema.BOX_DTYPE)
        s["views"].update(box=np.concatenate([g, boxes]), flip=np.concatenate([[0], flips]).astype(schema.FLIP_DTYPE))
        s.update(image_bytes=data, image_ext=sniff_image_type(data),
                 meta={"path": f"synthetic/{i}", "height": img.height, "width": img.width})
        samples.append(s)
    entries = []
    for n, part in enumerate(plan_shards(len(samples), shard_size)):
        with ShardFileWriter(out, schema.shard_name(n)) as w:
            for i in part:
                w.write(encode_sample(**samples[i]))
        entries.append({**w.record(), "first_index": part.start})
    write_manifest(out, {"num_classes": num_classes, "views": VIEWS, "topk": 3, "full_softmax": False,
                         "shards": entries})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg_shards")
    write_image_shards(out, mixed_images())
    return out


def replay_kwargs(shards, **kw):
    base = dict(urls=expand_urls(str(shards)), num_classes=10, num_views=VIEWS, teacher_labels="views",
                img_size=32, batch_size=3, steps=3)
    return {**base, **kw}


def as_batch(items: list[tuple[bytes, tuple, bool]], img_size: int) -> dict:
    """A collated batch of (bytes, box, flip), as EncodedShardReplay's worker makes it."""
    samples = []
    for n, (data, box, flip) in enumerate(items):
        layout = jpeg_layout(data)
        if layout is None:
            pixels, orientation = cut_view(decode_image(data), box, flip, img_size), 1
        else:
            pixels, orientation = torch.frombuffer(bytearray(data), dtype=torch.uint8), layout[0]
        samples.append({"data": pixels, "jpeg": torch.tensor(layout is not None), "key": f"k{n}",
                        "orientation": torch.tensor(orientation), "box": torch.tensor(box), "flip": torch.tensor(flip)})
    return collate(samples)


def mean_abs_diff(batch_views: torch.Tensor, items, img_size: int) -> tuple[float, int]:
    want = torch.stack([cut_view(decode_image(d), b, f, img_size) for d, b, f in items])
    diff = (batch_views.int() - want.int()).abs()
    return float(diff.float().mean()), int(diff.max())


def random_items(images: list[bytes], per_image: int, seed: int) -> list[tuple[bytes, tuple, bool]]:
    items = []
    for i, data in enumerate(images):
        img = decode_image(data)
        boxes, flips = random_view_boxes(seed=seed, key=f"i{i}", num_views=per_image, height=img.height,
                                         width=img.width)
        items += [(data, tuple(int(v) for v in b), bool(f)) for b, f in zip(boxes, flips)]
    return items


# --- worker side ---------------------------------------------------------------------------------

def test_jpeg_layout_routes_what_decode_jpeg_takes(image_bytes):
    photo = photo_jpeg(0, 30, 40)
    assert jpeg_layout(photo) == (1, 30, 40)
    assert jpeg_layout(with_orientation(photo, 6)) == (6, 30, 40)  # size as stored
    assert jpeg_layout(image_bytes["grey_jpeg"]) == (1, 48, 64)
    for name in ("cmyk_jpeg", "rgb_png", "webp", "gif", "text", "zero"):
        assert jpeg_layout(image_bytes[name]) is None, name


def test_samples_carry_bytes_box_and_the_stored_targets(shards):
    ds = EncodedShardReplay(**replay_kwargs(shards))
    ds.set_epoch(2)
    raw = next(iter_samples(expand_urls(str(shards))[0]))
    ex = ds.example(raw)
    v = epoch_view_index(seed=0, epoch=2, key=raw["key"], num_views=VIEWS)
    assert ex["jpeg"] and ex["data"].dtype == torch.uint8 and bytes(ex["data"].numpy()) == raw["image"]
    assert tuple(ex["box"].tolist()) == tuple(raw["box"][v]) and bool(ex["flip"]) == bool(raw["flip"][v])
    assert int(ex["teacher_hard"]) == int(raw["hard"][v]) and int(ex["label"]) == raw["label"]


def test_collate_keeps_the_bytes_as_a_list(shards):
    batch = next(iter(DataLoader(EncodedShardReplay(**replay_kwargs(shards)), batch_size=3, collate_fn=collate)))
    assert isinstance(batch["data"], list) and len(batch["data"]) == 3 and isinstance(batch["key"], list)
    assert batch["box"].shape == (3, 4) and batch["teacher"].shape == (3, 10) and batch["jpeg"].dtype == torch.bool


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_order_quotas_and_targets_are_shard_replays(shards, workers, world):
    for rank in range(world):
        kw = replay_kwargs(shards, rank=rank, world_size=world, steps=2, batch_size=2)
        ours, ref = EncodedShardReplay(**kw), ShardReplay(**kw, augment=PLAIN)
        ours.set_epoch(1)
        ref.set_epoch(1)
        a = list(DataLoader(ours, batch_size=2, num_workers=workers, collate_fn=collate))
        b = list(DataLoader(ref, batch_size=2, num_workers=workers))
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x["label"], y["label"]) and torch.equal(x["teacher"], y["teacher"])
            assert torch.equal(x["teacher_hard"], y["teacher_hard"])
            views = decode_and_cut(x, img_size=32, device="cpu")
            assert torch.equal(views, (y["image"] * 255).round().to(torch.uint8))


@pytest.mark.parametrize("mode", ["global", "none"])
def test_fresh_crop_modes_cut_shard_replays_crops(shards, mode):
    kw = replay_kwargs(shards, teacher_labels=mode, steps=3)
    ours, ref = EncodedShardReplay(**kw), ShardReplay(**kw, augment=PLAIN)
    for ds in (ours, ref):
        ds.set_epoch(4)
    a, b = list(ours), list(ref)
    assert len(a) == len(b) == 9
    views = decode_and_cut(collate(a), img_size=32, device="cpu")
    assert torch.equal(views, torch.stack([(x["image"] * 255).round().to(torch.uint8) for x in b]))
    assert ("teacher" in a[0]) == (mode == "global")


# --- decode_and_cut against cut_view -------------------------------------------------------------

def test_photos_cut_to_224_match_cut_view():
    items = random_items([photo_jpeg(s, *hw) for s, hw in enumerate([(375, 500), (500, 375)] * 2)], 4, seed=1)
    views = decode_and_cut(as_batch(items, 224), img_size=224, device="cpu")
    mad, worst = mean_abs_diff(views, items, 224)
    # The same libjpeg-turbo decode and torchvision's uint8 resize arithmetic: equal, but for
    # version drift of either library.
    assert mad < 0.05 and worst <= 2, (mad, worst)


def test_digits_cut_to_32_match_cut_view():
    digits = [encode(decode_image(render_digit(i)), "JPEG", quality=95) for i in range(6)]
    items = random_items(digits, 4, seed=2)
    views = decode_and_cut(as_batch(items, 32), img_size=32, device="cpu")
    mad, worst = mean_abs_diff(views, items, 32)
    assert mad < 0.05 and worst <= 2, (mad, worst)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation):
    data = with_orientation(photo_jpeg(4, 30, 44), orientation)
    pil = decode_image(data)  # exif_transpose'd
    # torchvision applies the orientation on CPU only; this path does it in the resampling.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tv = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                         apply_exif_orientation=True)
    assert torch.equal(tv, torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    box = (3, 5, pil.height - 7, pil.width - 9)
    items = [(data, box, False), (data, box, True), (data, (0, 0, pil.height, pil.width), False)]
    views = decode_and_cut(as_batch(items, 24), img_size=24, device="cpu")
    assert mean_abs_diff(views, items, 24) == (0.0, 0)


def test_grey_cmyk_png_and_orientation_mixed_in_one_batch(image_bytes):
    images = mixed_images()
    items = random_items(images, 2, seed=3)
    batch = as_batch(items, 32)
    kinds = [jpeg_layout(d) is not None for d, _, _ in items]
    assert batch["jpeg"].tolist() == kinds and not all(kinds) and any(kinds)
    views = decode_and_cut(batch, img_size=32, device="cpu")
    mad, worst = mean_abs_diff(views, items, 32)
    assert mad < 0.05 and worst <= 2


def test_every_stored_view_of_a_shard_set_is_the_teachers_view(shards):
    """Label fidelity: the pixels trained on are the pixels the teacher labelled, for every view."""
    for sample in iter_samples(expand_urls(str(shards))):
        items = [(sample["image"], tuple(int(v) for v in b), bool(f))
                 for b, f in zip(sample["box"], sample["flip"])]
        views = decode_and_cut(as_batch(items, 48), img_size=48, device="cpu")
        mad, worst = mean_abs_diff(views, items, 48)
        assert mad < 0.05 and worst <= 2, (sample["key"], mad, worst)


def test_a_jpeg_that_does_not_decode_is_named(image_bytes):
    data = image_bytes["rgb_jpeg"]
    batch = collate([{"data": torch.frombuffer(bytearray(d), dtype=torch.uint8), "jpeg": torch.tensor(True),
                      "key": k, "orientation": torch.tensor(1), "box": torch.tensor([0, 0, 4, 4]),
                      "flip": torch.tensor(False)} for d, k in ((data, "good"), (data[: len(data) // 2], "cut"))])
    with pytest.raises(ImageDecodeError, match="sample cut: truncated"):
        decode_and_cut(batch, img_size=8, device="cpu")


# --- the training-side iterator ------------------------------------------------------------------

def test_prefetch_off_cuda_is_the_transform_in_order():
    assert list(prefetch(iter("abc"), device="cpu", transform=lambda b, i: (b, i))) == [("a", 0), ("b", 1), ("c", 2)]


def test_device_batches_are_reproducible_normalised_and_train(shards):
    def epoch():
        ds = EncodedShardReplay(**replay_kwargs(shards, img_size=16, steps=2, batch_size=4))
        ds.set_epoch(0)
        loader = DataLoader(ds, batch_size=4, collate_fn=collate)
        return DeviceBatches(loader, img_size=16, device="cpu", augment=BatchAugment(), seed=1, epoch=0, rank=0)

    first, again = list(epoch()), list(epoch())
    assert len(first) == 2
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"])
        assert a["image"].dtype == torch.float32 and a["image"].shape == (4, 3, 16, 16)
        assert set(a) == {"image", "label", "teacher", "teacher_hard"}
    assert not torch.equal(first[0]["image"], first[1]["image"])
    assert -3 < float(torch.cat([b["image"] for b in first]).mean()) < 3
    torch.manual_seed(0)
    model = create_student("deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                           num_heads=2, num_classes=10)
    stats = train_one_epoch(model, DistillationLoss(distillation="soft", alpha=0.5), epoch(),
                            build_optimizer(model, lr=1e-3, weight_decay=0.0), device="cpu",
                            mixup=MixupCutmix(10, seed=0))
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])


@pytest.mark.gpu
def test_cuda_decode_and_cut_is_close_to_cut_view():
    items = random_items([photo_jpeg(s, *hw) for s, hw in enumerate([(375, 500), (500, 375)] * 4)], 4, seed=5)
    items += random_items([with_orientation(photo_jpeg(9, 90, 120), 6)], 4, seed=6)
    views = decode_and_cut(as_batch(items, 224), img_size=224, device="cuda")
    assert views.is_cuda
    mad, _ = mean_abs_diff(views.cpu(), items, 224)
    assert mad < 2.0, mad  # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's

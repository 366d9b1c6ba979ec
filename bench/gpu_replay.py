"""Replaying stored views: the per-image CPU path against the batched path, samples/s.

Both read the same synthetic shards (photo-like 500x375 JPEGs, quality 90, 8 stored views,
1000 classes) and produce the same training input (the stored view cut to 224 px, DeiT's
RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing 0.25):

    cpu      ``ShardReplay`` + ``Augment``, one sample at a time in this process, as one
             DataLoader worker does (Pillow decode, resized_crop, timm's Pillow RandAugment);
    batched  ``EncodedShardReplay`` reads (header only) in this process, then per batch
             ``decode_and_cut`` (one ``decode_jpeg`` call, one batched resampling) and
             ``BatchAugment`` on the device: CUDA when present, else the CPU.

Reported: the CPU path's samples/s (one process: what one DataLoader worker delivers); the
batched path's device step (decode + cut + augment of already-read batches), also split into
its two parts, and its reading alone (what a worker spends per sample on the header and the
bytes: in training that runs in DataLoader workers, in parallel). Ratio = batched device step /
CPU path: how many CPU loader workers one device step replaces.

Run: python bench/gpu_replay.py                 (batch 256, on CUDA when present)
     python bench/gpu_replay.py --quick         (batch 32, few images)
     python bench/gpu_replay.py --device cpu    (the batched path on the CPU)
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchutil import emit, header, photo_jpeg, sync, write_synthetic_shards
from deitpipe.shards.format.reader import iter_samples
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.shards.format.randaugment import BatchAugment, augment_generator
from deitpipe.student.gpu_replay import EncodedShardReplay, collate, decode_and_cut


def make_shards(out: Path, *, images: int, height: int, width: int, num_classes: int, views: int) -> list[str]:
    rng = np.random.default_rng(0)
    data = [photo_jpeg(rng, height=height, width=width, quality=90) for _ in range(images)]
    return write_synthetic_shards(out, images=data, labels=[i % num_classes for i in range(images)],
                                  num_classes=num_classes, views=views)


def replay_args(urls: list[str], args: argparse.Namespace, *, steps: int) -> dict:
    return dict(urls=urls, num_classes=args.classes, num_views=args.views, teacher_labels="views",
                img_size=args.img_size, batch_size=args.batch, steps=steps, seed=0)


def cpu_path(urls: list[str], args: argparse.Namespace, samples: int) -> dict[str, float]:
    """Samples/s of ``ShardReplay.example`` (decode, cut, augment) on samples already read."""
    ds = ShardReplay(**replay_args(urls, args, steps=1), augment=Augment(img_size=args.img_size))
    ds.set_epoch(0)
    raw = list(itertools.islice(itertools.cycle(iter_samples(urls)), samples + 1))
    ds.example(raw[0])  # warm-up
    errors = 0
    start = time.perf_counter()
    for sample in raw[1:]:
        try:
            ds.example(sample)
        except ValueError:  # timm's PosterizeIncreasing at level 10 asks Pillow 13 for 0 bits
            errors += 1
    return {"samples_per_s": samples / (time.perf_counter() - start), "posterize_errors": errors}


def batched_path(urls: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    steps = args.batches + 1
    ds = EncodedShardReplay(**replay_args(urls, args, steps=steps))
    ds.set_epoch(0)
    it = iter(ds)
    augment = BatchAugment()
    start = time.perf_counter()
    batches = [collate([next(it) for _ in range(args.batch)]) for _ in range(steps)]
    read_s = time.perf_counter() - start
    if device.type == "cuda":  # as a DataLoader with pin_memory=True hands them over
        batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    decode_s = augment_s = 0.0
    for i, batch in enumerate(batches):  # batch 0 warms up: kernels, nvJPEG handles, allocator
        sync(device)
        t0 = time.perf_counter()
        views = decode_and_cut(batch, img_size=args.img_size, device=device)
        sync(device)
        t1 = time.perf_counter()
        augment(views, generator=augment_generator(seed=0, epoch=0, rank=0, step=i, device=device))
        sync(device)
        if i:
            decode_s += t1 - t0
            augment_s += time.perf_counter() - t1
    samples = args.batches * args.batch
    return {"device_samples_per_s": samples / (decode_s + augment_s),
            "decode_cut_samples_per_s": samples / decode_s, "augment_samples_per_s": samples / augment_s,
            "read_samples_per_s": steps * args.batch / read_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 batches, few images")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the batched path")
    parser.add_argument("--batches", type=int, default=3, help="timed batches of the batched path (after one warm-up)")
    parser.add_argument("--cpu-samples", type=int, default=256, help="timed samples of the CPU path")
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs in the shards")
    parser.add_argument("--img-size", type=int, default=224, help="view side")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the teacher distribution")
    parser.add_argument("--views", type=int, default=8, help="stored views per image")
    parser.add_argument("--device", default=None, help="device of the batched path (default: cuda if present)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.batches, args.cpu_samples, args.images = 32, 2, 48, 48
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    header(device=device, batch=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        urls = make_shards(Path(tmp), images=args.images, height=375, width=500, num_classes=args.classes,
                           views=args.views)
        cpu = cpu_path(urls, args, args.cpu_samples)
        emit({"path": "cpu", "device": "cpu", **cpu, "threads": torch.get_num_threads()})
        batched = batched_path(urls, args, device)
        emit({"path": "batched", "device": str(device), "batch": args.batch, **batched})
        emit({"ratio_batched_device_over_cpu": batched["device_samples_per_s"] / cpu["samples_per_s"]})


if __name__ == "__main__":
    main()

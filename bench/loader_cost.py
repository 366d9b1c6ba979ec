"""What reading the shards costs the training loop: shard-fed against in-memory batches.

The same ``train_one_epoch`` (student, hard distillation, AdamW, mixup/cutmix as train-student's
defaults) is fed twice:
    shards  ``ShardReplay`` + DataLoader: read the tar, decode the image, cut the stored view,
            RandAugment + random erasing, reconstruct the teacher distribution, collate;
    memory  the batches that loader produced, collected beforehand (decoded, cut and augmented
            already), replayed from a list.
Images/s of each (steady, after ``--warmup`` steps; best of ``--rounds`` alternating rounds) and
the ratio shards / memory (goal >= 0.9). ``loader_img_s`` is the loader alone, without training.

Rows: DeiT-Ti at 224 on photo-like JPEGs (1000 classes), and the digits-sized student (32 px,
patch 4, dim 96, depth 4) on the digits rendered at 32 px (10 classes). Teacher outputs in the
shards are random (only timing matters). Each row runs once per shard schema version in
``--schemas`` (the version 1 set holds the same samples as the version 2 one, rewritten).

``read`` rows time the reader alone, per sample: ``read_shard`` + ``decode_sample`` over the
whole shard set, best of ``--read-reps`` passes, for each schema version with and without the
reader's two shortcuts: ``split`` (deitpipe's own ustar splitter; without it every shard goes
through webdataset's ``tarfile`` path) and ``cache`` (npy headers parsed once per shard set;
without it once per member). The shortcuts are switched off by replacing them in this process.

Run: python bench/loader_cost.py            (both rows)
     python bench/loader_cost.py --quick    (tiny settings)
     python bench/loader_cost.py --rows digits_32 --read-only   (the reader alone, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchutil import StepClock, emit, header, photo_jpeg, write_synthetic_shards
from deitpipe.shards.format import reader, schema
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.shards.inputs import resolve_source
from deitpipe.shards.inputs.embedded import render_digit
from deitpipe.student import DistillationLoss, MixupCutmix, build_optimizer, create_student, scaled_lr, train_one_epoch
from deitpipe.student.data import Augment, ShardReplay

ROWS = {
    "deit_tiny_224": dict(model="deit_tiny_distilled_patch16_224", overrides={}, data="photos", num_classes=1000),
    "digits_32": dict(model="deit_tiny_distilled_patch16_224", data="digits", num_classes=10,
                      overrides=dict(img_size=32, patch_size=4, embed_dim=96, depth=4)),
}


def make_shards(out: Path, row: dict, args: argparse.Namespace) -> list[str]:
    rng = np.random.default_rng(0)
    if row["data"] == "photos":
        images = [photo_jpeg(rng, height=args.image_size, width=args.image_size * 4 // 3)
                  for _ in range(args.images)]
        labels = [i % row["num_classes"] for i in range(args.images)]
    else:
        cands = resolve_source("digits", image_size=32).candidates[:args.images]
        images = [render_digit(int(c.ref), image_size=32) for c in cands]
        labels = [c.label for c in cands]
    return write_synthetic_shards(out, images=images, labels=labels, num_classes=row["num_classes"],
                                  views=args.views)


def rewrite_shards(urls: list[str], out: Path, *, schema_version: int) -> list[str]:
    """The same samples, in the same shards and order, written in ``schema_version``."""
    paths = []
    for url in urls:
        with ShardFileWriter(out, Path(url).name) as writer:
            for raw in reader.read_shard(url):
                s = reader.decode_sample(raw)
                fields = {f: s[f] for f in schema.VIEW_FIELDS + (schema.SOFTMAX_FIELD,) if f in s}
                writer.write(encode_sample(key=s["key"], image_bytes=s["image"], image_ext=s["image_ext"],
                                           label=s["label"], meta=s["meta"], views=fields,
                                           schema_version=schema_version))
        paths.append(str(writer.path))
    return paths


class _NoCache(dict):
    """A header cache that remembers nothing: every member's header is parsed."""

    def __setitem__(self, key, value) -> None:
        pass


@contextlib.contextmanager
def reader_shortcuts(*, split: bool, cache: bool) -> Iterator[None]:
    """Switch the reader's ustar splitter and npy header cache off (False) inside the block."""
    saved = reader.split_ustar, reader._NPY_HEADERS
    if not split:
        reader.split_ustar = lambda data, url: None  # every shard through webdataset's tarfile path
    reader._NPY_HEADERS = {} if cache else _NoCache()
    try:
        yield
    finally:
        reader.split_ustar, reader._NPY_HEADERS = saved


def read_cost(urls: list[str], *, reps: int) -> float:
    """Microseconds per sample of ``read_shard`` + ``decode_sample`` over ``urls``, best of ``reps``."""
    best = float("inf")
    for _ in range(reps):
        start, count = time.perf_counter(), 0
        for url in urls:
            for raw in reader.read_shard(url):
                reader.decode_sample(raw)
                count += 1
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def read_rows(name: str, sets: dict[int, list[str]], args: argparse.Namespace) -> None:
    for version, urls in sets.items():
        nbytes = sum(Path(u).stat().st_size for u in urls)
        samples = sum(len(reader.read_shard(u)) for u in urls)
        for split in (True, False):
            for cache in (True, False):
                with reader_shortcuts(split=split, cache=cache):
                    us = read_cost(urls, reps=args.read_reps)
                emit({"row": "read", "data": name, "schema_version": version, "views": args.views,
                      "split": split, "cache": cache, "us_per_sample": us, "samples": samples,
                      "tar_bytes_per_sample": nbytes / samples})


def run(model, loss_fn, optimizer, batches, *, num_classes: int, steps: int, warmup: int) -> float:
    clock = StepClock()
    mixup = MixupCutmix(num_classes, seed=0)  # train-student's defaults: mixup 0.8, cutmix 1.0
    train_one_epoch(model, loss_fn, batches, optimizer, device="cpu", mixup=mixup,
                    max_steps=warmup + steps, progress=clock)
    return clock.steady(warmup)


def measure(name: str, row: dict, *, batch_size: int, workers: int, urls: list[str],
            args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = create_student(row["model"], num_classes=row["num_classes"], drop_path_rate=0.1, **row["overrides"])
    loss_fn = DistillationLoss(distillation="hard", alpha=0.5, label_smoothing=0.1)
    optimizer = build_optimizer(model, lr=scaled_lr(5e-4, batch_size), weight_decay=0.05)
    steps = args.warmup + args.steps

    def shard_loader() -> DataLoader:
        data = ShardReplay(urls=urls, num_classes=row["num_classes"], num_views=args.views,
                           teacher_labels="views", img_size=model.config.img_size, batch_size=batch_size,
                           steps=steps, augment=Augment())
        return DataLoader(data, batch_size=batch_size, num_workers=workers)

    start = time.perf_counter()
    in_memory = list(shard_loader())  # the same batches, decoded, cut and augmented beforehand
    loader_rate = len(in_memory) * batch_size / (time.perf_counter() - start)
    best = {"shards": 0.0, "memory": 0.0}
    for _ in range(args.rounds):  # alternate so drift in machine load hits both
        for mode in best:
            batches = shard_loader() if mode == "shards" else in_memory
            rate = run(model, loss_fn, optimizer, batches, num_classes=row["num_classes"],
                       steps=args.steps, warmup=args.warmup)
            best[mode] = max(best[mode], rate)
    return {"row": name, "batch": batch_size, "img_size": model.config.img_size,
            "loader_workers": workers, "shards_img_s": best["shards"],
            "memory_img_s": best["memory"], "ratio": best["shards"] / best["memory"],
            "loader_img_s": loader_rate, "goal": 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the 224 row")
    parser.add_argument("--digits-batch-size", type=int, default=64, help="batch of the digits row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best is kept")
    parser.add_argument("--images", type=int, default=128, help="images in the shards")
    parser.add_argument("--image-size", type=int, default=300, help="short side of the generated photos")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0],
                        help="DataLoader workers (train-student's --loader-workers); several give several rows")
    parser.add_argument("--schemas", type=int, nargs="+", default=[2, 1], choices=list(schema.READABLE_VERSIONS),
                        help="shard schema versions to measure")
    parser.add_argument("--read-reps", type=int, default=5, help="passes over the shard set per read row")
    parser.add_argument("--read-only", action="store_true", help="only the read rows, no training")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds")
    args = parser.parse_args()
    batches = {"deit_tiny_224": args.batch_size, "digits_32": args.digits_batch_size}
    if args.quick:
        args.steps, args.warmup, args.rounds, args.images, args.image_size = 2, 1, 1, 16, 64
        batches = {"deit_tiny_224": 2, "digits_32": 8}
        ROWS["deit_tiny_224"]["overrides"] = dict(depth=2)

    header(rows=args.rows, steps=args.steps, loader_workers=args.loader_workers, schemas=args.schemas)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        for name in args.rows:
            written = make_shards(work / name, ROWS[name], args)  # schema.SCHEMA_VERSION
            sets = {v: written if v == schema.SCHEMA_VERSION
                    else rewrite_shards(written, work / f"{name}-v{v}", schema_version=v) for v in args.schemas}
            read_rows(name, sets, args)
            if args.read_only:
                continue
            for version, urls in sets.items():
                for workers in args.loader_workers:
                    row = measure(name, ROWS[name], batch_size=batches[name], workers=workers, urls=urls, args=args)
                    emit({"row": name, "schema_version": version, **row})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

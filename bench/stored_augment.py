"""What storing each view's whole augmentation costs: bytes, label-teacher speed, loader speed.

Two label sets of the same inputs and teacher: crop-only views (schema 2) and views that carry
DeiT's whole recipe (schema 3: label-teacher --rand-augment 9 --random-erasing 0.25 --mixup 0.8
--cutmix 1.0). Rows:
    bytes      payload bytes a view (``schema.bytes_per_view``) and on-disk bytes a view (the
               shards' size less the images', over the views), both sets; goal <= 96 B at top-10.
    label      label-teacher views/s (--launcher local, end to end, shards written), both sets;
               goal: augmented >= 0.8 x crop-only.
    loader     training samples/s of the worker loader (``ShardReplay``, one process, as
               ``--loader cpu`` with no DataLoader workers): crop-only views with the student's
               random DeiT augmentation (RandAugment + erasing, then batch mixup/CutMix) against
               the stored augmentation replayed; goal: replay >= 0.9 x random.
    gpu-loader the same for ``--loader gpu``'s batch step (``EncodedShardReplay`` + the batched
               decode, cut and augmentation), on the CPU when there is no GPU.

Run: python bench/stored_augment.py            (photo-like JPEGs at 300 px, RegNetY-400MF, 224 px)
     python bench/stored_augment.py --quick    (digits at 32 px, tiny teacher; seconds)
On a GPU machine (the teacher and --loader gpu's batch step on CUDA), carrying the webdataset
wheels as bench/gpu_check.sh says: PYTHONPATH=/tmp/site python bench/stored_augment.py --images 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchutil import emit, header, photo_folder, save_random_teacher
from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.label import label_teacher
from deitpipe.shards.format import schema
from deitpipe.shards.format.reader import expand_urls, read_shard
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.student.engine import MixupCutmix

RECIPE = dict(rand_augment=9.0, random_erasing=0.25, mixup=0.8, cutmix=1.0)


def label(data: Path, out: Path, args: argparse.Namespace, weights: Path, augment: dict) -> dict:
    start = time.perf_counter()
    label_teacher(LabelConfig(data=str(data), out=str(out), teacher=args.teacher, teacher_weights=str(weights),
                              views=args.views, view_size=args.size, shard_size=args.shard_size,
                              batch_size=args.batch_size, device=args.device, launcher="local", progress=False,
                              **augment))
    seconds = time.perf_counter() - start
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    samples = manifest["inputs"]["labelled"]
    views = samples * (args.views + 1)
    tar = sum(e["bytes"] for e in manifest["shards"])
    images = sum(len(raw[k]) for url in expand_urls(str(out)) for raw in read_shard(url)
                 for k in raw if k in schema.IMAGE_EXTENSIONS)
    return {"views_s": views / seconds, "seconds": seconds, "disk_bytes_per_view": (tar - images) / views,
            "manifest": manifest}


def loader_rate(urls: list[str], *, stored: dict | None, args: argparse.Namespace, steps: int) -> float:
    """Samples/s of the worker loader over ``steps`` batches (first batch not counted)."""
    augment = (Augment(rand_augment=None, random_erasing=0.0, img_size=args.size) if stored else
               Augment(rand_augment=9, random_erasing=0.25, img_size=args.size))
    ds = ShardReplay(urls=urls, num_classes=args.num_classes, num_views=args.views, teacher_labels="views",
                     img_size=args.size, batch_size=args.loader_batch, steps=steps + 1, augment=augment,
                     stored_augment=stored)
    mix = None if stored else MixupCutmix(args.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)
    loader = iter(DataLoader(ds, batch_size=args.loader_batch))
    batch = next(loader)
    start = time.perf_counter()
    for batch in loader:
        if mix is not None:
            batch = mix(batch)
    return steps * args.loader_batch / (time.perf_counter() - start)


def gpu_loader_rate(urls: list[str], *, stored: dict | None, args: argparse.Namespace, steps: int) -> float:
    """Samples/s of ``--loader gpu``'s batch step on this machine's device."""
    from deitpipe.shards.format.augment import AugmentSpec, ViewRenderer
    from deitpipe.shards.format.randaugment import BatchAugment, augment_generator
    from deitpipe.student import gpu_replay

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = gpu_replay.EncodedShardReplay(urls=urls, num_classes=args.num_classes, num_views=args.views,
                                       teacher_labels="views", img_size=args.size, batch_size=args.loader_batch,
                                       steps=steps + 1, stored_augment=stored)
    augment = (BatchAugment(rand_augment=None, random_erasing=0.0) if stored else BatchAugment())
    renderer = ViewRenderer(AugmentSpec.from_dict(stored)) if stored else None
    mix = None if stored else MixupCutmix(args.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)
    loader = DataLoader(ds, batch_size=args.loader_batch, collate_fn=gpu_replay.collate)
    start, done = None, 0
    for step, batch in enumerate(loader):
        out = gpu_replay.prepare_batch(batch, img_size=args.size, device=device, augment=augment,
                                       generator=augment_generator(seed=0, epoch=0, rank=0, step=step, device=device),
                                       renderer=renderer)
        if mix is not None:
            out = mix(out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if start is None:
            start = time.perf_counter()
        else:
            done += len(out["image"])
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--teacher", default="regnet_y_400mf")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="the view size (the student's input)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    parser.add_argument("--shard-size", type=int, default=48)
    parser.add_argument("--loader-batch", type=int, default=32)
    parser.add_argument("--loader-steps", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="label-teacher's teacher")
    parser.add_argument("--quick", action="store_true", help="digits at 32 px and a tiny teacher")
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.size, args.teacher, args.num_classes = 64, 32, 32, "resnet18", 10
        args.loader_steps = 4
    header(bench="stored_augment", images=args.images, size=args.size, teacher=args.teacher, views=args.views)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deitpipe-stored-aug-"))
    data = photo_folder(work / "photos", images=args.images, classes=10, size=args.image_size)
    weights = save_random_teacher(work, args.teacher, num_classes=args.num_classes,
                                  **({"resize": args.size, "crop": args.size} if args.quick else {}))
    plain = label(data, work / "crop-only", args, weights, {})
    full = label(data, work / "augmented", args, weights, RECIPE)
    for name, run, augment in (("crop-only", plain, False), ("augmented", full, True)):
        emit({"row": "bytes", "set": name, "schema": run["manifest"]["schema_version"],
              "payload_bytes_per_view": schema.bytes_per_view(args.num_classes, 10, False, augment=augment),
              "disk_bytes_per_view": run["disk_bytes_per_view"]})
    emit({"row": "label", "crop_only_views_s": plain["views_s"], "augmented_views_s": full["views_s"],
          "ratio": full["views_s"] / plain["views_s"], "goal": 0.8})
    stored = full["manifest"]["augment"]
    urls = {"crop-only": expand_urls(str(work / "crop-only")), "augmented": expand_urls(str(work / "augmented"))}
    torch.set_num_threads(1)  # as in a DataLoader worker process
    rand = loader_rate(urls["crop-only"], stored=None, args=args, steps=args.loader_steps)
    replay = loader_rate(urls["augmented"], stored=stored, args=args, steps=args.loader_steps)
    emit({"row": "loader", "random_samples_s": rand, "replay_samples_s": replay, "ratio": replay / rand, "goal": 0.9})
    grand = gpu_loader_rate(urls["crop-only"], stored=None, args=args, steps=args.loader_steps)
    greplay = gpu_loader_rate(urls["augmented"], stored=stored, args=args, steps=args.loader_steps)
    emit({"row": "gpu-loader", "device": "cuda" if torch.cuda.is_available() else "cpu",
          "random_samples_s": grand, "replay_samples_s": greplay, "ratio": greplay / grand, "goal": 0.9})


if __name__ == "__main__":
    main()

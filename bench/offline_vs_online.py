"""Offline distillation's speed-up: a student trained from shards against the paper's live teacher.

Both runs are ``train_one_epoch`` with the same student, loss, optimizer, mixup/cutmix, batch and
shard loader (``ShardReplay`` + DataLoader, the same augmentations); the offline run reads the
stored view labels, the online run reads no labels and calls the live teacher that train-student
builds for ``--online-teacher`` (``pipeline.launch.online_teacher_fn``) on every batch.

Also timed alone, on one fixed batch: the teacher's forward (``t_teacher``; the same callable,
and for reference the same model in channels-last layout, which the offline labeller uses) and
one student training step (``t_student``). The ideal speed-up of offline training is
``1 + t_teacher / t_student``; the measured one is offline images/s / online images/s, and
measured / ideal (goal >= 0.9) says how much of the saving survives the rest of the loop
(data loading, mixup, the optimizer). Images/s and times are medians of the steps after
``--warmup``, so that a busy moment on a shared machine moves one step, not the figure.

Teacher and student are random-init (timing only); the shards hold generated photo-like JPEGs
with random teacher outputs, in the label-teacher format.

Run: python bench/offline_vs_online.py           (DeiT-Ti at 224 vs RegNetY-16GF, batch 8)
     python bench/offline_vs_online.py --quick   (tiny settings)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchutil import StepClock, emit, header, photo_jpeg, save_random_teacher, write_synthetic_shards
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.launch import online_teacher_fn
from deitpipe.student import (
    DistillationLoss,
    MixupCutmix,
    build_optimizer,
    create_student,
    scaled_lr,
    train_one_epoch,
)
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.teacher import build_teacher


def loader(urls: list[str], args: argparse.Namespace, *, labels: str, img_size: int) -> DataLoader:
    dataset = ShardReplay(urls=urls, num_classes=args.num_classes, num_views=args.views, teacher_labels=labels,
                          img_size=img_size, batch_size=args.batch_size, steps=args.warmup + args.steps,
                          augment=Augment())
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.loader_workers)


def seconds_per_call(fn, *, warmup: int, iters: int) -> float:
    """Median seconds of one call: a busy moment on a shared machine moves one call, not the figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_distilled_patch16_224")
    parser.add_argument("--teacher", default="regnet_y_16gf")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--iters", type=int, default=10, help="calls timed for t_teacher and t_student")
    parser.add_argument("--distillation", default="hard", choices=["hard", "soft"])
    parser.add_argument("--images", type=int, default=64, help="generated images in the shards")
    parser.add_argument("--image-size", type=int, default=256, help="short side of the generated images")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, default=0, help="as train-student's --loader-workers")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds")
    args = parser.parse_args()
    student_overrides, teacher_prep = {}, {}
    if args.quick:
        args.teacher, args.batch_size, args.steps, args.warmup, args.iters = "regnet_y_400mf", 4, 3, 1, 2
        args.images, args.image_size, args.num_classes = 8, 48, 10
        student_overrides = dict(img_size=32, patch_size=4, embed_dim=96, depth=2)
        teacher_prep = dict(crop=32, resize=32)

    header(model=args.model, teacher=args.teacher, batch=args.batch_size, steps=args.steps,
           loader_workers=args.loader_workers)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-online-"))
    try:
        rng = np.random.default_rng(0)
        jpegs = [photo_jpeg(rng, height=args.image_size, width=args.image_size * 4 // 3)
                 for _ in range(args.images)]
        urls = write_synthetic_shards(work / "shards", images=jpegs, labels=[i % args.num_classes for i in
                                      range(args.images)], num_classes=args.num_classes, views=args.views)
        weights = save_random_teacher(work / "teacher", args.teacher, num_classes=args.num_classes, **teacher_prep)
        cfg = TrainConfig(shards=str(work / "shards"), model=args.model, batch_size=args.batch_size,
                          distillation=args.distillation, online_teacher=args.teacher,
                          teacher_weights=str(weights))
        device = torch.device("cpu")
        teach = online_teacher_fn(cfg, args.num_classes, device)

        torch.manual_seed(0)
        model = create_student(args.model, num_classes=args.num_classes, drop_path_rate=cfg.drop_path,
                               **student_overrides)
        size = model.config.img_size
        loss_fn = DistillationLoss(distillation=cfg.distillation, alpha=cfg.alpha, tau=cfg.tau,
                                   label_smoothing=cfg.label_smoothing)
        optimizer = build_optimizer(model, lr=scaled_lr(cfg.lr, cfg.batch_size), weight_decay=cfg.weight_decay)

        def mixup() -> MixupCutmix:
            return MixupCutmix(args.num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               switch_prob=cfg.mixup_switch, seed=0)

        rates = {}
        for mode in ("offline", "online"):
            clock = StepClock(device)
            data = loader(urls, args, labels="views" if mode == "offline" else "none", img_size=size)
            stats = train_one_epoch(model, loss_fn, data, optimizer, device=device, mixup=mixup(),
                                    online_teacher=teach if mode == "online" else None,
                                    max_steps=args.warmup + args.steps, progress=clock)
            rates[mode] = clock.median_rate(args.warmup)
            emit({"mode": mode, "img_s": rates[mode], "img_s_mean": clock.steady(args.warmup),
                  "img_s_with_first_steps": stats["images_per_s"],
                  "steps": int(stats["steps"])})

        # The parts alone, on one fixed batch.
        batch = next(iter(loader(urls, args, labels="views", img_size=size)))
        t_teacher = seconds_per_call(lambda: teach(batch["image"]), warmup=1, iters=args.iters)
        raw, info = build_teacher(args.teacher, weights_path=weights, num_classes=args.num_classes)
        raw = raw.to(memory_format=torch.channels_last).eval()
        x = torch.randn(args.batch_size, 3, info.preprocessing.crop, info.preprocessing.crop)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            t_teacher_cl = seconds_per_call(lambda: raw(x), warmup=1, iters=args.iters)
        clock = StepClock(device)
        train_one_epoch(model, loss_fn, [batch] * (1 + args.iters), optimizer, device=device, mixup=mixup(),
                        progress=clock)
        t_student = args.batch_size / clock.median_rate(1)
        ideal = 1 + t_teacher / t_student
        measured = rates["offline"] / rates["online"]
        emit({"t_teacher_s": t_teacher, "t_teacher_channels_last_s": t_teacher_cl, "t_student_s": t_student,
              "ideal_speedup": ideal, "measured_speedup": measured, "measured_over_ideal": measured / ideal,
              "goal": 0.9, "batch": args.batch_size})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

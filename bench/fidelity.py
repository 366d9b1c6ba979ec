"""The fidelity table: does replaying stored views come within noise of the live teacher?

On digits (1,200 training / 597 held-out images, 32 px), the same student and schedule, several
seeds each, held-out top-1 (mean ± standard deviation) of:
    no distillation;
    hard / soft distillation from the global label only (fixed teacher, fresh crops);
    hard / soft distillation from stored views, replayed;
    hard / soft distillation from the teacher run live on the student's batch.
Also the low-noise measure of the mechanism: how often the label the student trains with agrees
with the live teacher on the pixels the student sees (global labels under fresh crops vs stored
views replayed).

The students train in-process with train-student's training core (``student.trainer.train``,
as ``--launcher local`` runs it), so the table measures learning, not orchestration.

Run: python bench/fidelity.py [--seeds 0 1 2] [--epochs 25] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deitpipe.pipeline.config import LabelConfig
from deitpipe.pipeline.demo import DemoConfig, _teacher, student_config
from deitpipe.pipeline.label import label_teacher
from deitpipe.pipeline.launch import online_teacher_fn
from deitpipe.pipeline.train import teacher_labels_mode
from deitpipe.shards.reader import expand_urls
from deitpipe.shards.sources import digits_image_folder
from deitpipe.student import create_student, evaluate
from deitpipe.student.data import Augment, EvalImages, ShardReplay, eval_items
from deitpipe.student.trainer import train

ROWS = [("no distillation", "none", None, False), ("fixed teacher, hard", "hard", "global", False),
        ("fixed teacher, soft", "soft", "global", False), ("stored views, hard", "hard", "views", False),
        ("stored views, soft", "soft", "views", False), ("live teacher, hard", "hard", None, True),
        ("live teacher, soft", "soft", None, True)]


def train_one(cfg, *, info, val, online, out: Path) -> float:
    """Train one student with train-student's core in this process; returns held-out top-1 (avg head)."""
    mode = teacher_labels_mode(cfg, info["views"])
    train(replace(cfg, val=None, out=str(out)), info=info, mode=mode, out=out, device=torch.device("cpu"),
          cpus=torch.get_num_threads(), save=lambda state, metrics: None, online_teacher=online)
    model = create_student(cfg.model, num_classes=info["num_classes"], **cfg.model_overrides())
    model.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    return evaluate(model, val, device="cpu", num_classes=info["num_classes"])["top1_avg"]


def label_agreement(*, urls, views, teacher, mode, min_scale, epochs=3) -> float:
    """Percent of training labels that equal the live teacher's argmax on the same crop."""
    agree = total = 0
    for epoch in range(epochs):
        ds = ShardReplay(urls=urls, num_classes=10, num_views=views, teacher_labels=mode, img_size=32,
                         batch_size=100, steps=12, min_scale=min_scale,
                         augment=Augment(rand_augment=None, random_erasing=0.0))
        ds.set_epoch(epoch)
        for batch in DataLoader(ds, batch_size=100):
            agree += int((teacher(batch["image"]).argmax(1) == batch["teacher_hard"]).sum())
            total += len(batch["label"])
    return 100.0 * agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fidelity-out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--rows", nargs="+", default=None, help="subset of row names")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = [0], 1, 1
    torch.set_num_threads(torch.get_num_threads())
    demo = DemoConfig(out=args.out, teacher_epochs=args.teacher_epochs, student_epochs=args.epochs, progress=False)
    out = Path(args.out)
    data = digits_image_folder(out / "data", image_size=32, seed=0)
    teacher = _teacher(demo, data / "train", data / "val", out / "teacher" / "teacher.pt")
    label_teacher(LabelConfig(data=str(data / "train"), out=str(out / "shards"), teacher=demo.teacher,
                              teacher_weights=teacher["weights"], views=demo.views, min_scale=demo.min_scale,
                              shard_size=300, device="cpu", progress=False))
    urls = expand_urls(str(out / "shards"))
    info = {"urls": urls, "num_classes": 10, "views": demo.views, "samples": 1200}
    items, _ = eval_items(str(data / "val"))
    val = DataLoader(EvalImages(items, img_size=32, crop_pct=1.0), batch_size=256)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "teacher": demo.teacher,
                      "teacher_top1": round(100 * teacher["val_top1"], 2), "epochs": args.epochs,
                      "seeds": args.seeds, "views": demo.views, "min_scale": demo.min_scale}), flush=True)
    base = student_config(demo, shards=out / "shards", out=out / "unused", val=data / "val", distillation="hard")
    live_cfg = replace(base, online_teacher=demo.teacher, teacher_weights=teacher["weights"])
    live = online_teacher_fn(live_cfg, 10, torch.device("cpu"))
    for mode in ("global", "views"):
        pct = label_agreement(urls=urls, views=demo.views, teacher=live, mode=mode, min_scale=demo.min_scale)
        print(json.dumps({"measure": "training label == live teacher on the same crop", "labels": mode,
                          "agree_pct": round(pct, 2)}), flush=True)
    table = {}
    for name, distillation, labels, online in ROWS:
        if args.rows and name not in args.rows:
            continue
        scores = []
        for seed in args.seeds:
            cfg = replace(base, distillation=distillation, teacher_labels=labels if distillation != "none" else None,
                          seed=seed)
            start = time.perf_counter()
            scores.append(train_one(cfg, info=info, val=val, online=live if online else None,
                                    out=out / "students" / f"{name.replace(' ', '-').replace(',', '')}-{seed}"))
            print(json.dumps({"row": name, "seed": seed, "top1": round(scores[-1], 2),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
        table[name] = {"scores": scores, "mean": statistics.mean(scores), "sd": sd}
        print(json.dumps({"row": name, "mean": round(table[name]["mean"], 2), "sd": round(sd, 2)}), flush=True)
    (out / "fidelity.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()

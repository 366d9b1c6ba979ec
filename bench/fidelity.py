"""The fidelity table: what does a student distilled from stored labels gain, beyond noise?

On an embedded data set (cluttered digits by default, ``--data digits`` for the plain ones:
1,200 training / 597 held-out digits, 32 px), the demo's teacher, views and students
(``pipeline/demo.py``), several seeds each, held-out top-1 of the averaged heads, the mean of the
last ``--last`` evaluations (less noise than the last one alone), of the following rows. On
cluttered digits each held-out digit is rendered under ``--val-renders`` clutter seeds (5: 2,985
images, never a training digit), which cuts the noise of the evaluation itself:
    same data: no distillation (with and without DeiT's augmentation); hard / soft distillation
    from stored views, replayed; hard distillation from stored views that carry DeiT's whole
    augmentation (label-teacher --rand-augment 9 --random-erasing 0.25 --mixup 0.8 --cutmix 1.0),
    replayed exactly; hard distillation from the teacher run live on the student's batch, without
    and with DeiT's augmentation (the teacher then labels the augmented, mixed batch);
    few labels: K labels a class alone (as many steps as the others, --epoch-repeats); K labels
    and the teacher's labels on the other 1,200 - 10K images (label-teacher --unlabeled); the
    student with every label (no distillation) is the ceiling.
Each row gives mean ± sd over seeds and the mean difference from its baseline with its standard
error, paired by seed (a seed fixes a student's initial weights and data order in every row) and
unpaired (Welch). Every student is evaluated after each epoch, so the curves show whether the
schedule was long enough.

Also the low-noise measure of the mechanism: how often the label the student trains with equals
the live teacher's argmax on exactly the pixels the student is given, for the un-augmented view
and after DeiT's RandAugment, random erasing and mixup/cutmix (the stored labels mixed as the
training loop mixes them).

The students train in-process with train-student's training core (``student.trainer.train``,
as ``--launcher local`` runs it), so the table measures learning, not orchestration. Each
finished student leaves ``result.json`` in its folder, and a rerun skips it: a long table can be
run in parts (``--rows``, ``--seeds``) and summed up with ``--summary``.

A patient schedule (``--epochs N --views V``) labels its own sets (``shards-vV``) and trains its
own students (``students-eN-vV``) beside the demo's.

Run: python bench/fidelity.py [--data cluttered-digits] [--seeds 0 1 2 3 4] [--epochs N] [--views V] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deitpipe.pipeline.config import DEMO_DEFAULTS, LabelConfig
from deitpipe.pipeline.demo import DemoConfig, _check_same_data, _teacher, student_config
from deitpipe.pipeline.label import label_teacher
from deitpipe.pipeline.launch import online_teacher_fn
from deitpipe.pipeline.train import shard_sets_info, teacher_labels_mode
from deitpipe.shards.format.manifest import write_json_atomic
from deitpipe.shards.format.reader import expand_urls
from deitpipe.shards.inputs.embedded import digits_image_folder
from deitpipe.student.data import Augment, ShardReplay
from deitpipe.student.engine import MixupCutmix
from deitpipe.student.trainer import train

NONE, LIVE = "no distillation", "live teacher, hard"
FEW, FEW_TEACHER = "K labels alone", "K labels + teacher on the rest, hard"
STORED, STORED_AUG, NONE_AUG = "stored views, hard", "stored views + augmentation, hard", "no distillation, DeiT augmentation"
LIVE_AUG = "live teacher + DeiT augmentation, hard"
# name -> (distillation, teacher labels, live teacher, shard sets, baseline); "K" is --labels-per-class.
ROWS = {
    NONE: ("none", None, False, ("all",), None),
    NONE_AUG: ("none", None, False, ("all",), NONE),
    STORED: ("hard", "views", False, ("all",), NONE),
    STORED_AUG: ("hard", "views", False, ("augmented",), NONE_AUG),
    "stored views, soft": ("soft", "views", False, ("all",), NONE),
    LIVE: ("hard", None, True, ("all",), NONE),
    LIVE_AUG: ("hard", None, True, ("all",), NONE_AUG),
    FEW: ("none", None, False, ("labeled",), None),
    FEW_TEACHER: ("hard", "views", False, ("labeled", "unlabeled"), FEW),
}
# DeiT's recipe: what "augmented" shards store, and what NONE_AUG's student draws itself.
RECIPE = dict(rand_augment=9.0, random_erasing=0.25, mixup=0.8, cutmix=1.0)
STUDENT_AUGMENT = {NONE_AUG: RECIPE, LIVE_AUG: RECIPE}
# Further differences each row is reported against, beside its baseline.
COMPARE = {STORED_AUG: (LIVE_AUG, STORED, LIVE, NONE)}
# What the student's input goes through, step by step, for the consistency measure: DeiT's
# RandAugment (rand-m9-mstd0.5), random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5).
INPUTS = [("un-augmented view (flip only)", None, 0.0, False), ("+ RandAugment", 9.0, 0.0, False),
          ("+ RandAugment + erasing", 9.0, 0.25, False), ("+ RandAugment + erasing + mixup/cutmix", 9.0, 0.25, True)]


def train_one(cfg, *, info, online, out: Path, last: int) -> dict:
    """Train one student with train-student's core in this process (or reuse a finished one).

    Returns:
        ``{"top1": mean held-out top-1 of the averaged heads over the last ``last`` epochs,
        "final": after the last epoch, "curve": after every epoch, "seconds": training time}``.
    """
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.perf_counter()
    mode = teacher_labels_mode(cfg, info["views"])
    history = train(replace(cfg, out=str(out)), info=info, mode=mode, out=out, device=torch.device("cpu"),
                    cpus=torch.get_num_threads(), save=lambda state, metrics: None, online_teacher=online)
    curve = [round(h["val_top1_avg"], 2) for h in history]
    result = {"top1": round(statistics.mean(curve[-last:]), 2), "final": curve[-1], "curve": curve,
              "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(done, result)
    return result


def label_agreement(*, urls, views, teacher, mode, min_scale, img_size, rand_augment=None,
                    random_erasing=0.0, mixup=False, epochs=2, batch_size=100, stored_augment=None) -> float:
    """Percent of training targets whose argmax equals the live teacher's argmax on the same pixels.

    The target is the stored (or global) teacher distribution of each sample, mixed as the
    training loop mixes it when ``mixup`` is on; the pixels are the batch after every step.
    With ``stored_augment`` (the manifest's "augment"), each stored view is replayed whole.
    """
    agree = total = 0
    for epoch in range(epochs):
        augment = Augment(rand_augment=rand_augment, random_erasing=random_erasing, img_size=img_size)
        ds = ShardReplay(urls=urls, num_classes=10, num_views=views, teacher_labels=mode, img_size=img_size,
                         batch_size=batch_size, steps=12, min_scale=min_scale, seed=epoch, augment=augment,
                         stored_augment=stored_augment)
        ds.set_epoch(epoch)
        mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, seed=epoch) if mixup else None
        for batch in DataLoader(ds, batch_size=batch_size):
            if mix is not None:
                batch = mix(batch)
            with torch.no_grad():
                live = teacher(batch["image"]).argmax(1)
            agree += int((live == batch["teacher"].argmax(1)).sum())
            total += len(live)
    return 100.0 * agree / total


def _diff(a: list[float], b: list[float]) -> dict:
    """Mean of a - b and its standard error, paired by seed and unpaired (Welch)."""
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    paired = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    welch = math.sqrt(statistics.variance(a) / n + statistics.variance(b) / n) if n > 1 else float("nan")
    return {"mean": statistics.mean(diffs), "se_paired": paired, "se_unpaired": welch}


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per row: scores, mean, sd, mean curve, and its difference from its baseline (and, for the
    few-label rows, from the student with every label, the ceiling)."""
    table = {}
    for name, runs in results.items():
        scores = [r["top1"] for r in runs]
        epochs = min(len(r["curve"]) for r in runs)
        row = {"scores": scores, "mean": statistics.mean(scores),
               "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
               "curve": [round(statistics.mean(r["curve"][e] for r in runs), 2) for e in range(epochs)]}
        baseline = ROWS[name][4]
        few = ROWS[name][3] in (("labeled",), ("labeled", "unlabeled"))
        others = (("vs_baseline", baseline), ("vs_ceiling", NONE if few else None))
        for key, other in others:
            if other and other in results and len(results[other]) == len(runs):
                row[key] = {"row": other, **_diff(scores, [r["top1"] for r in results[other]])}
        row["vs_others"] = [{"row": other, **_diff(scores, [r["top1"] for r in results[other]])}
                            for other in COMPARE.get(name, ()) if other in results and len(results[other]) == len(runs)]
        table[name] = row
    return table


def markdown(table: dict[str, dict], seeds: list[int]) -> str:
    """The table as BENCHMARKS.md shows it."""
    lines = ["| student | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | − baseline (SE paired / "
             "unpaired) | paired SEs | − every label |", "|" + "---|" * (len(seeds) + 5)]
    for name, row in table.items():
        cells = [f"{v:.2f}" for v in row["scores"]]
        d = row.get("vs_baseline")
        vs = f"{d['mean']:+.2f} ({d['se_paired']:.2f} / {d['se_unpaired']:.2f}) vs {d['row']}" if d else ""
        ratio = f"{d['mean'] / d['se_paired']:.1f}" if d and d["se_paired"] > 0 else ""
        c = row.get("vs_ceiling")
        ceiling = f"{c['mean']:+.2f} ({c['se_paired']:.2f})" if c else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean']:.2f} ± {row['sd']:.2f} | {vs} | "
                     f"{ratio} | {ceiling} |")
    for name, row in table.items():
        for d in row.get("vs_others", []):
            lines.append(f"\n{name} − {d['row']}: {d['mean']:+.2f} (paired SE {d['se_paired']:.2f}, "
                         f"{d['mean'] / d['se_paired']:.1f} SE; unpaired {d['se_unpaired']:.2f})"
                         if d["se_paired"] > 0 else f"\n{name} − {d['row']}: {d['mean']:+.2f}")
    return "\n".join(lines)


def curves_markdown(table: dict[str, dict], points: int = 10) -> str:
    """Each row's mean held-out top-1 after about ``points`` evenly spaced epochs (the last included)."""
    epochs = min(len(row["curve"]) for row in table.values())
    picks = sorted({round(epochs * (i + 1) / points) for i in range(points)} - {0})
    lines = ["| student | " + " | ".join(f"ep {e}" for e in picks) + " |", "|" + "---|" * (len(picks) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{row['curve'][e - 1]:.1f}" for e in picks) + " |"
              for name, row in table.items()]
    return "\n".join(lines)


def teacher_accuracy(weights: str, demo: DemoConfig, val: Path) -> float:
    """The teacher's top-1 on the held-out folder ``val``, through its own eval transform."""
    from deitpipe.shards.inputs.factory import resolve_source
    from deitpipe.teacher import build_teacher
    from deitpipe.teacher.train import evaluate_teacher

    model, info = build_teacher(demo.teacher, weights_path=weights, num_classes=10)
    return evaluate_teacher(model, resolve_source(str(val)), info.preprocessing)


def _label(out: Path, folder: str, spec: str, demo: DemoConfig, weights: str, *, unlabeled: bool = False,
           augment: dict | None = None) -> Path:
    shards = out / folder
    if not (shards / "manifest.json").exists() or not json.loads((shards / "manifest.json").read_text()).get("complete"):
        label_teacher(LabelConfig(data=spec, out=str(shards), teacher=demo.teacher, teacher_weights=weights,
                                  views=demo.views, min_scale=demo.min_scale, view_size=demo.student_size,
                                  unlabeled=unlabeled, shard_size=300, device="cpu", launcher="local",
                                  progress=False, **(augment or {})))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fidelity-out")
    parser.add_argument("--data", default="cluttered-digits", choices=tuple(DEMO_DEFAULTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--views", type=int, default=None, help="stored views an image (default: the demo's); "
                        "with --epochs, a patient schedule: its shards and students get folders of their own")
    parser.add_argument("--labels-per-class", type=int, default=10, help="K of the few-label rows")
    parser.add_argument("--val-renders", type=int, default=5, help="cluttered digits: the students' held-out set "
                        "is each held-out digit under this many clutter seeds (1: the demo's 597 images)")
    parser.add_argument("--last", type=int, default=3, help="a student's score: mean of its last N evaluations")
    parser.add_argument("--rows", nargs="+", default=None, help="subset of row names")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--summary", action="store_true", help="only print the table of the finished students")
    parser.add_argument("--no-agreement", action="store_true", help="skip the consistency measure")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = [0, 1], 1, 1
    torch.set_num_threads(args.threads)
    k = args.labels_per_class
    demo = DemoConfig(out=args.out, data=args.data, teacher_epochs=args.teacher_epochs, student_epochs=args.epochs,
                      labels_per_class=k, views=args.views, progress=False)
    # Sets of other views and students of another schedule never meet the demo's in their folders.
    tag = "" if args.views is None else f"-v{demo.views}"
    students = "students" if args.epochs is None and args.views is None else f"students-e{demo.student_epochs}{tag}"
    renders = args.val_renders if demo.data == "cluttered-digits" else 1
    students += "" if renders == 1 else f"-r{renders}"  # scores on another held-out set
    out = Path(args.out)
    _check_same_data(out, demo.data)  # every stage below resumes: one data set per output directory
    data = digits_image_folder(out / "data", image_size=demo.image_size, seed=0, kind=demo.data)
    teacher = _teacher(demo, data / "train", data / "val", out / "teacher" / "teacher.pt")
    val = data / "val"
    if renders > 1:
        val = digits_image_folder(out / f"data-r{renders}", image_size=demo.image_size, seed=0, kind=demo.data,
                                  val_renders=renders) / "val"
    teacher_top1 = 100 * teacher_accuracy(teacher["weights"], demo, val)
    wanted = {w for name, row in ROWS.items() if not args.rows or name in args.rows for w in row[3]}
    folders = {"all": (f"shards{tag}", "train", None), "labeled": (f"shards-labeled-{k}{tag}", f"labeled-{k}", None),
               "unlabeled": (f"shards-unlabeled-{k}{tag}", f"unlabeled-{k}", None),
               "augmented": (f"shards-augmented{tag}", "train", RECIPE)}
    sets = {w: _label(out, folder, f"{demo.data}:{split}", demo, teacher["weights"], unlabeled=w == "unlabeled",
                      augment=augment)
            for w, (folder, split, augment) in folders.items() if w in wanted or w in ("all", "augmented")}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "data": demo.data,
                      "teacher": demo.teacher, "teacher_top1": round(teacher_top1, 2),
                      "held_out_images": sum(1 for _ in val.rglob("*.png")),
                      "epochs": demo.student_epochs, "seeds": args.seeds, "views": demo.views, "labels_per_class": k,
                      "min_scale": demo.min_scale, "teacher_size": demo.img_size, "student_size": demo.student_size,
                      "patch_size": demo.patch_size, "last": args.last}), flush=True)
    base = student_config(demo, shards=sets["all"], out=out / "unused", val=val, distillation="hard")
    live_cfg = replace(base, online_teacher=demo.teacher, teacher_weights=teacher["weights"])
    live = online_teacher_fn(live_cfg, 10, torch.device("cpu"))
    urls = expand_urls(str(sets["all"]))
    agreement = out / "agreement.json"
    if not args.summary and not args.no_agreement and not agreement.exists():
        found = [{"labels": mode, "input": name, "agree_pct": round(label_agreement(
            urls=urls, views=demo.views, teacher=live, mode=mode, min_scale=demo.min_scale,
            img_size=demo.student_size, rand_augment=ra, random_erasing=erase, mixup=mix), 2)}
            for mode in ("views", "global") for name, ra, erase, mix in INPUTS]
        stored = shard_sets_info((str(sets["augmented"]),))["augment"]
        found.append({"labels": "views with their augmentation", "input": INPUTS[-1][0], "agree_pct": round(
            label_agreement(urls=expand_urls(str(sets["augmented"])), views=demo.views, teacher=live, mode="views",
                            min_scale=demo.min_scale, img_size=demo.student_size, stored_augment=stored), 2)})
        write_json_atomic(agreement, found)
    for line in json.loads(agreement.read_text()) if agreement.exists() else []:
        print(json.dumps({"measure": "training target == live teacher on the same pixels", **line}), flush=True)
    results: dict[str, list[dict]] = {}
    for name, (distillation, labels, online, which, _) in ROWS.items():
        if args.rows and name not in args.rows:
            continue
        info = shard_sets_info(tuple(str(sets[w]) for w in which))
        runs = []
        for seed in args.seeds:
            folder = out / students / f"{name.replace(' ', '-').replace(',', '')}-{seed}"
            if args.summary:
                if (folder / "result.json").exists():
                    runs.append(json.loads((folder / "result.json").read_text()))
                continue
            cfg = replace(base, distillation=distillation, seed=seed,
                          teacher_labels=labels if distillation != "none" else None,
                          epoch_repeats=1200 / info["samples"] if which == ("labeled",) else 1.0,
                          **STUDENT_AUGMENT.get(name, {}))
            runs.append(train_one(cfg, info=info, online=live if online else None, out=folder, last=args.last))
            print(json.dumps({"row": name, "seed": seed, **runs[-1]}), flush=True)
        if len(runs) == len(args.seeds):
            results[name] = runs
    table = summarise(results)
    for name, row in table.items():
        print(json.dumps({"row": name, **row}), flush=True)
    print(markdown(table, args.seeds))
    if table:
        print(curves_markdown(table))
    write_json_atomic(out / "fidelity.json", {"config": {**vars(args), **{k: getattr(demo, k) for k in (
        "data", "teacher", "teacher_epochs", "student_epochs", "views", "min_scale", "img_size", "student_size",
        "patch_size")}}, "teacher_top1": teacher_top1, "table": table})


if __name__ == "__main__":
    main()

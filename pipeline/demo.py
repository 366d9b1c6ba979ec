"""``deitpipe demo``: the whole pipeline on an embedded data set, with nothing to download.

The data set is cluttered digits by default (:mod:`deitpipe.shards.inputs.cluttered`: scikit-learn's
digits at random places on a canvas of fragments, where a convnet teacher has an edge a small ViT
lacks), or the plain digits (``--data digits``).

1. render the fixed train / held-out split as ImageFolder trees;
2. train the convnet teacher on the train split;
3. label, in this process (label-teacher's local launcher), the train split with views cut at
   the student's size; and, for the few-label rows, ``NAME:labeled-K`` and, without labels,
   ``NAME:unlabeled-K``;
4. train the students in this process (train-student's local launcher), each row against its
   baseline: every label without distillation; every label and soft distillation from the
   stored views; K labels a class alone; K labels and the teacher's labels on the rest;
5. evaluate teacher and students on the held-out split, print the rows, write results.json and
   the plots (every row's held-out curve on one plot).
Every stage is the library call behind its command, so a rerun of the demo resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deitpipe.pipeline.analyze import analyze_student, save_figure
from deitpipe.pipeline.config import DemoConfig, LabelConfig, TrainConfig, absolute_spec
from deitpipe.pipeline.evaluate import evaluate_student
from deitpipe.pipeline.label import label_teacher
from deitpipe.pipeline.train import train_student
from deitpipe.shards.format.manifest import write_json_atomic
from deitpipe.shards.inputs.embedded import digits_image_folder
from deitpipe.student.runfiles import read_metrics
from deitpipe.teacher.train import TeacherTrainConfig, train_teacher

TRAIN_IMAGES = 1200  # the embedded sets' fixed training split


@dataclass(frozen=True)
class Row:
    """One student of the demo: its shards, how it trains, and the row it is compared with."""

    key: str  # results.json's students[key] and the run folder student-KEY
    name: str
    shards: tuple[str, ...]
    distillation: str
    baseline: str | None = None
    epoch_repeats: float = 1.0


def rows(config: DemoConfig) -> list[Row]:
    """The demo's students, each against its baseline (same data: no distillation; few labels:
    the K labels alone, trained as many steps as the others)."""
    out = [Row("none", "every label, no distillation", ("shards",), "none"),
           # soft: the stored top-k is the same-data row that beats its baseline beyond noise in
           # the fidelity table (BENCHMARKS.md: +3.6 points, 3.4 paired SE; hard +1.5, 2.6 SE)
           Row("distilled", "every label + stored views (soft)", ("shards",), "soft", baseline="none")]
    k = config.labels_per_class
    if k:
        out += [Row("few", f"{k} labels a class alone", (f"shards-labeled-{k}",), "none",
                    epoch_repeats=TRAIN_IMAGES / (10 * k)),
                Row("few_teacher", f"{k} labels a class + teacher on the rest",
                    (f"shards-labeled-{k}", f"shards-unlabeled-{k}"), "hard", baseline="few")]
    return out


def student_config(demo: DemoConfig, *, shards: Path | tuple[Path, ...], out: Path, val: Path, distillation: str,
                   epoch_repeats: float = 1.0) -> TrainConfig:
    """The demo's student: a 4-block ViT at the student's input size, AdamW without DeiT's
    ImageNet regularisers, which stop a ViT on 1,200 images from fitting at all."""
    sets = tuple(str(p) for p in shards) if isinstance(shards, tuple) else str(shards)
    return TrainConfig(
        shards=sets[0] if isinstance(sets, tuple) and len(sets) == 1 else sets, out=str(out), val=str(val),
        model="deit_tiny_distilled_patch16_224", img_size=demo.student_size, patch_size=demo.patch_size,
        embed_dim=192, depth=4, num_heads=6,
        # lr is per 512 images (scaled by the batch): 3e-4 at batch 32.
        epochs=demo.student_epochs, epoch_repeats=epoch_repeats, batch_size=32, lr=0.0048, warmup_epochs=1.0,
        min_lr=1e-5, drop_path=0.0, min_scale=demo.min_scale,
        distillation=distillation, alpha=0.5, teacher_labels="views" if distillation != "none" else None,
        rand_augment=None, random_erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
        seed=demo.seed, progress=demo.progress, num_workers=1, launcher="local", device="cpu",
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns what results.json holds."""
    start = time.perf_counter()
    out = Path(absolute_spec(config.out))  # every stage and worker sees the same directory
    _check_same_data(out, config.data)
    # The split is the embedded sets' fixed one (as NAME:train and NAME:labeled-K read it).
    data = digits_image_folder(out / "data", image_size=config.image_size, seed=0, kind=config.data)
    train_dir, val_dir = data / "train", data / "val"
    timings: dict[str, float] = {}
    t = time.perf_counter()
    teacher = _teacher(config, train_dir, val_dir, out / "teacher" / "teacher.pt")
    timings["teacher"] = time.perf_counter() - t
    t = time.perf_counter()
    k = config.labels_per_class
    sets = [(f"{config.data}:train", "shards", False)]
    if k:
        sets += [(f"{config.data}:labeled-{k}", f"shards-labeled-{k}", False),
                 (f"{config.data}:unlabeled-{k}", f"shards-unlabeled-{k}", True)]
    for spec, folder, unlabeled in sets:
        label_teacher(LabelConfig(data=spec, out=str(out / folder), teacher=config.teacher,
                                  teacher_weights=teacher["weights"], views=config.views, topk=10,
                                  min_scale=config.min_scale, view_size=config.student_size, unlabeled=unlabeled,
                                  shard_size=300, seed=config.seed, device="cpu", launcher="local",
                                  progress=config.progress))
    timings["label"] = time.perf_counter() - t
    runs: dict[str, Path] = {}
    for row in rows(config):
        t = time.perf_counter()
        runs[row.key] = out / f"student-{row.key.replace('_', '-')}"
        train_student(student_config(config, shards=tuple(out / s for s in row.shards), out=runs[row.key],
                                     val=val_dir, distillation=row.distillation, epoch_repeats=row.epoch_repeats))
        timings[f"student_{row.key}"] = time.perf_counter() - t
    evals = {key: evaluate_student(checkpoint=str(run), data=str(val_dir)) for key, run in runs.items()}
    analysis = analyze_student(run=str(runs["distilled"]), data=str(out / "shards"), out=str(out / "plots" / "distilled"))
    teacher_top1 = 100.0 * teacher["val_top1"]  # percent, like the students
    table = [{"name": row.name, "key": row.key, "top1": evals[row.key]["top1_avg"],
              "baseline": next((r.name for r in rows(config) if r.key == row.baseline), None),
              "seconds": round(timings[f"student_{row.key}"], 1)} for row in rows(config)]
    curves = _curves_plot({row.name: read_metrics(runs[row.key] / "metrics.jsonl") for row in rows(config)},
                          teacher_top1, out / "plots" / "curves.png")
    results = {
        "teacher_top1": teacher_top1,
        "student_none_top1": evals["none"]["top1_avg"],
        "student_distilled_top1": evals["distilled"]["top1_avg"],
        "seconds": round(time.perf_counter() - start, 1),
        "rows": [{k: v for k, v in r.items() if k != "key"} for r in table],
        "students": evals, "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "token_similarity": analysis["token_similarity"], "plots": [*curves, *analysis["plots"]],
        "config": asdict(config), "held_out_images": int(evals["none"]["n"]),
    }
    write_json_atomic(out / "results.json", results)
    return results


def _curves_plot(metrics: dict[str, list[dict]], teacher_top1: float, path: Path) -> list[str]:
    """Every row's held-out top-1 after each epoch on one plot, the teacher's as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plots extra is not installed
        return []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, lines in metrics.items():
        points = [(m["epoch"] + 1, m["val_top1_avg"]) for m in lines if "val_top1_avg" in m]
        if points:
            ax.plot(*zip(*points), label=name)
    ax.axhline(teacher_top1, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set(xlabel="epoch", ylabel="held-out top-1 (%)", ylim=(0, 100), title="Students, held-out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [save_figure(fig, str(path))]


def _check_same_data(out: Path, data: str) -> None:
    """A rerun resumes every stage, so an output directory holds the demo of one data set only."""
    import json

    marker = out / "data" / ".digits-folder.json"
    if marker.exists():
        held = json.loads(marker.read_text()).get("kind", "digits")
        if held != data:
            raise ValueError(f"{out} holds a demo run on {held}; remove it or pass another --out to run on {data}")


def _teacher(config: DemoConfig, train_dir: Path, val_dir: Path, weights: Path) -> dict[str, Any]:
    """Train the teacher, or reuse a finished one from an earlier run of the demo."""
    import json

    summary = weights.with_name("train_summary.json")
    if weights.exists() and summary.exists():
        return json.loads(summary.read_text())
    weights.parent.mkdir(parents=True, exist_ok=True)
    result = train_teacher(TeacherTrainConfig(
        data=str(train_dir), out=str(weights), teacher=config.teacher, epochs=config.teacher_epochs,
        optimizer="adamw",  # on 32 px digits AdamW converges in a few epochs where SGD stalls
        img_size=config.img_size, min_scale=config.teacher_min_scale, val=str(val_dir), seed=config.seed,
        progress=config.progress))
    keep = {k: v for k, v in result.items() if k in ("weights", "sidecar", "train_top1", "val_top1", "epochs",
                                                      "seconds")}
    write_json_atomic(summary, keep)
    return keep


def format_results(results: dict[str, Any]) -> str:
    """The demo's table: held-out top-1 of the teacher and of every row, each row's gain over its
    baseline, and its heads."""
    n = results["held_out_images"]
    data = results["config"].get("data", "digits")
    top1 = {r["name"]: r["top1"] for r in results.get("rows", [])}
    w = max([len("student, " + r["name"]) for r in results.get("rows", [])] + [20])
    lines = [f"held-out top-1 on {n} images of {data} (one image = {100 / n:.2f} points)",
             f"{'model':<{w}} {'top-1':>7} {'gain':>7}   {'class':>6} {'dist':>6}  baseline",
             f"{'teacher':<{w}} {results['teacher_top1']:>7.2f}"]
    # results["students"] holds the rows' evaluations in the rows' order.
    for r, e in zip(results.get("rows", []), results["students"].values()):
        gain = f"{r['top1'] - top1[r['baseline']]:>+7.2f}" if r.get("baseline") in top1 else f"{'':>7}"
        lines.append(f"{'student, ' + r['name']:<{w}} {r['top1']:>7.2f} {gain}   {e['top1_cls']:>6.2f} "
                     f"{e['top1_dist']:>6.2f}  {r.get('baseline') or ''}")
    lines.append(f"total {results['seconds']:.0f} s " + str(results["stage_seconds"]))
    return "\n".join(lines)

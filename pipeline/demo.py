"""``deitpipe demo``: the whole pipeline on an embedded data set, with nothing to download.

The data set is cluttered digits by default (:mod:`deitpipe.shards.inputs.cluttered`: scikit-learn's
digits at random places on a canvas of fragments, where a convnet teacher has an edge a small ViT
lacks), or the plain digits (``--data digits``).

1. split the data set into train and held-out ImageFolder trees (fixed seed);
2. train the convnet teacher on the train split;
3. label the train split with views (label-teacher, local Ray);
4. train two students from the same shards in this process (the local launcher): no
   distillation, and hard distillation from the stored views;
5. evaluate teacher and students on the held-out split, print a table, write results.json and
   the analysis plots.
Every stage is the library call behind its command, so a rerun of the demo resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deitpipe.pipeline.analyze import analyze_student
from deitpipe.pipeline.config import DemoConfig, LabelConfig, TrainConfig, absolute_spec
from deitpipe.pipeline.evaluate import evaluate_student
from deitpipe.pipeline.label import label_teacher
from deitpipe.pipeline.raysession import ray_session
from deitpipe.pipeline.train import train_student
from deitpipe.shards.format.manifest import write_json_atomic
from deitpipe.shards.inputs.embedded import digits_image_folder
from deitpipe.teacher.train import TeacherTrainConfig, train_teacher


def student_config(demo: DemoConfig, *, shards: Path, out: Path, val: Path, distillation: str) -> TrainConfig:
    """The demo's student: a 4-block ViT at the data set's input size, DeiT recipe scaled to 1,200 images."""
    return TrainConfig(
        shards=str(shards), out=str(out), val=str(val), model="deit_tiny_distilled_patch16_224",
        img_size=demo.img_size, patch_size=demo.patch_size, embed_dim=96, depth=4, num_heads=3,
        # lr is per 512 images (scaled by the batch): 2e-3 at batch 32.
        epochs=demo.student_epochs, batch_size=32, lr=0.032, warmup_epochs=min(2.0, demo.student_epochs / 4),
        min_lr=1e-5, drop_path=0.0, min_scale=demo.min_scale,
        distillation=distillation, alpha=0.5, teacher_labels="views" if distillation != "none" else None,
        # On 1,200 small images the heavy ImageNet regularisers only slow learning down.
        rand_augment=None, random_erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
        seed=demo.seed, progress=demo.progress, num_workers=1, launcher="local",
    )


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns what results.json holds."""
    start = time.perf_counter()
    out = Path(absolute_spec(config.out))  # every stage and worker sees the same directory
    _check_same_data(out, config.data)
    data = digits_image_folder(out / "data", image_size=config.image_size, seed=config.seed, kind=config.data)
    train_dir, val_dir = data / "train", data / "val"
    timings: dict[str, float] = {}
    with ray_session(None):  # one local Ray for every stage
        t = time.perf_counter()
        teacher = _teacher(config, train_dir, val_dir, out / "teacher" / "teacher.pt")
        timings["teacher"] = time.perf_counter() - t
        t = time.perf_counter()
        label_teacher(LabelConfig(data=str(train_dir), out=str(out / "shards"), teacher=config.teacher,
                                  teacher_weights=teacher["weights"], views=config.views, topk=10,
                                  min_scale=config.min_scale,
                                  shard_size=300, seed=config.seed, device="cpu", progress=config.progress))
        timings["label"] = time.perf_counter() - t
        runs = {}
        for name, distillation in (("none", "none"), ("distilled", "hard")):
            t = time.perf_counter()
            runs[name] = out / f"student-{name}"
            train_student(student_config(config, shards=out / "shards", out=runs[name], val=val_dir,
                                         distillation=distillation))
            timings[f"student_{name}"] = time.perf_counter() - t
    evals = {name: evaluate_student(checkpoint=str(run), data=str(val_dir)) for name, run in runs.items()}
    analysis = analyze_student(run=str(runs["distilled"]), data=str(out / "shards"), out=str(out / "plots"))
    results = {
        "teacher_top1": 100.0 * teacher["val_top1"],  # percent, like the students
        "student_none_top1": evals["none"]["top1_avg"],
        "student_distilled_top1": evals["distilled"]["top1_avg"],
        "seconds": round(time.perf_counter() - start, 1),
        "students": evals, "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "token_similarity": analysis["token_similarity"], "plots": analysis["plots"],
        "config": asdict(config), "held_out_images": int(evals["none"]["n"]),
    }
    write_json_atomic(out / "results.json", results)
    return results


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
    """The demo's table: held-out top-1 of the teacher and of each student head."""
    rows = [("teacher", results["teacher_top1"], None, None)]
    for name in ("none", "distilled"):
        e = results["students"][name]
        rows.append((f"student ({'no distillation' if name == 'none' else 'hard, stored views'})",
                     e["top1_avg"], e["top1_cls"], e["top1_dist"]))
    n = results["held_out_images"]
    data = results["config"].get("data", "digits")
    lines = [f"held-out top-1 on {n} images of {data} (one image = {100 / n:.2f} points)",
             f"{'model':<36} {'average':>8} {'class':>8} {'dist':>8}"]
    for name, avg, cls, dist in rows:
        cells = [f"{v:>8.2f}" if v is not None else f"{'':>8}" for v in (avg, cls, dist)]
        lines.append(f"{name:<36} " + " ".join(cells))
    lines.append(f"total {results['seconds']:.0f} s " + str(results["stage_seconds"]))
    return "\n".join(lines)

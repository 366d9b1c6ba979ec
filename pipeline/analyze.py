"""``deitpipe analyze``: what a trained distilled student learned from its two tokens.

Reports, as in the DeiT paper's section 5: the cosine similarity of the class and distillation
tokens layer by layer (the paper: 0.06 at the input, 0.93 after the last layer), how often each
head agrees with the teacher and with the truth, and the training curves from metrics.jsonl. Plots
need matplotlib (``pip install deitpipe[plots]``); without it the tables are still written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from deitpipe.pipeline.evaluate import resolve_student
from deitpipe.shards import storage
from deitpipe.shards.format.manifest import write_json_atomic
from deitpipe.student import evaluate
from deitpipe.student.heldout import EvalImages, eval_items
from deitpipe.student.runfiles import read_metrics


def analyze_student(*, run: str, data: str, out: str | None = None, max_images: int = 512) -> dict[str, Any]:
    """Analyse the student in run directory ``run`` on ``data``.

    Args:
        run: a train-student run directory (config.json, student.pt, metrics.jsonl).
        data: held-out data; label-teacher shards give agreement with the teacher too.
        out: where analysis.json and the PNG plots go (default: ``run``).
        max_images: images used for the token similarity.
    Returns:
        ``{"token_similarity": [...], "heads": {...}, "curves": {...}, "plots": [...],
        "skipped": [{"path", "reason"}]}``; images that do not decode are skipped and listed.
    """
    model = resolve_student(run)
    if not model.distilled:
        raise ValueError(f"{run}: the student has no distillation token; analyze needs a distilled model")
    items, _ = eval_items(data)
    dataset = EvalImages(items, img_size=model.config.img_size, skip_undecodable=True)
    loader = DataLoader(dataset, batch_size=128)
    sims, seen = None, 0
    for batch in dataset.decodable(loader, []):
        n = batch["image"].shape[0]
        s = model.token_similarity(batch["image"]) * n
        sims, seen = (s if sims is None else sims + s), seen + n
        if seen >= max_images:
            break
    if not seen:
        raise ValueError(f"--data {data}: no decodable images to analyse ({len(items)} found)")
    skipped: list[dict[str, str]] = []
    heads = evaluate(model, dataset.decodable(loader, skipped), device=torch.device("cpu"),
                     num_classes=model.num_classes)
    curves = _curves(storage.join(run, "metrics.jsonl"))
    report = {"run": run, "data": data, "images": seen, "skipped": skipped,
              "token_similarity": [round(float(v), 4) for v in (sims / seen)], "heads": heads, "curves": curves}
    dest = out or run  # a directory or an s3:// prefix
    if not storage.is_object_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, dest)
    write_json_atomic(storage.join(dest, "analysis.json"), report)
    return report


def _curves(path: str) -> dict[str, list[float]]:
    rows = read_metrics(path)
    keys = ["epoch", "loss", "cls", "dist", "lr", "val_top1_cls", "val_top1_dist", "val_top1_avg"]
    return {k: [r[k] for r in rows if k in r] for k in keys if any(k in r for r in rows)}


def _plots(report: dict[str, Any], dest: str) -> list[str]:
    # matplotlib is optional (the plots extra) and slow to import: loaded only when plotting.
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sims = report["token_similarity"]
    ax.plot(range(len(sims)), sims, marker="o")
    ax.set(xlabel="layer (0 = input)", ylabel="cos(class token, distillation token)", ylim=(-0.1, 1.05),
           title="Class vs distillation token")
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, storage.join(dest, "token_similarity.png")))
    curves = report["curves"]
    if curves.get("epoch"):
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        for k in ("loss", "cls", "dist"):
            if len(curves.get(k, [])) == len(curves["epoch"]):
                a.plot(curves["epoch"], curves[k], label=k)
        a.set(xlabel="epoch", ylabel="training loss")
        a.legend()
        for k in ("val_top1_cls", "val_top1_dist", "val_top1_avg"):
            if len(curves.get(k, [])) == len(curves["epoch"]):
                b.plot(curves["epoch"], curves[k], label=k.removeprefix("val_top1_"))
        b.set(xlabel="epoch", ylabel="held-out top-1 (%)")
        if any(k.startswith("val_") for k in curves):
            b.legend()
        paths.append(save_figure(fig, storage.join(dest, "curves.png")))
    return paths


def save_figure(fig, path: str) -> str:
    """Save a matplotlib figure as PNG to ``path`` (local or object storage), atomically, and close it."""
    import matplotlib.pyplot as plt  # optional dependency, imported by _plots before any call

    fig.tight_layout()
    try:
        with storage.atomic_output(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return str(path)


def format_report(report: dict[str, Any]) -> str:
    h = report["heads"]
    sims = report["token_similarity"]
    skipped = report.get("skipped", [])
    lines = [f"{report['run']} on {report['data']}{f' ({len(skipped)} skipped)' if skipped else ''}",
             "cos(class, distillation token) by layer: " + " ".join(f"{v:.2f}" for v in sims),
             f"{'head':<18} {'top-1 truth':>12} {'agree teacher':>14}"]
    for label, key in (("class", "cls"), ("distillation", "dist"), ("average", "avg")):
        agree = h.get(f"agree_teacher_{key}")
        lines.append(f"{label:<18} {h[f'top1_{key}']:>12.2f} " + (f"{agree:>14.2f}" if agree is not None else f"{'-':>14}"))
    lines += [f"  skipped {item['path']}: {item['reason']}" for item in skipped[:10]]
    lines += [f"plot: {p}" for p in report["plots"]]
    return "\n".join(lines)

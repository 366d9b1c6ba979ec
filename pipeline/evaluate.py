"""``deitpipe evaluate``: a trained student on held-out data, head by head."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from deitpipe.shards import storage
from deitpipe.shards.format.image import ImageDecodeError
from deitpipe.student import create_student, evaluate, load_checkpoint, read_state_dict
from deitpipe.student.heldout import EvalImages, eval_items

_SIZES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def _run_config(run_dir: str) -> dict[str, Any]:
    """The run's config.json (written by train-student), or {} when there is none."""
    path = storage.join(run_dir, "config.json")
    if not storage.is_file(path):
        return {}
    try:
        cfg = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it from the run, or pass the "
                         "weights file from a directory without it together with the model options") from exc
    return cfg if isinstance(cfg, dict) else {}


def resolve_student(checkpoint: str, *, model: str | None = None, num_classes: int | None = None,
                    **overrides: Any) -> torch.nn.Module:
    """Build the student a checkpoint belongs to and load it.

    Args:
        checkpoint: a run directory (its config.json says the model), its student.pt, or any
            DeiT checkpoint file.
        model: variant name when no config.json is at hand.
        num_classes: head size; default from config/weights.
        **overrides: img_size, patch_size, embed_dim, depth, num_heads (None values ignored).
    Returns:
        The model in eval mode.
    Raises:
        ValueError: one line naming the file, when the checkpoint is missing, unreadable, not a
            state dict, or does not fit the model.
    """
    path = checkpoint.rstrip("/") if storage.is_object_uri(checkpoint) else os.path.abspath(checkpoint)
    is_dir = storage.is_dir(path)
    run_dir = path if is_dir else path.rsplit("/", 1)[0]
    weights = storage.join(path, "student.pt") if is_dir else path
    if is_dir and not storage.is_file(weights):
        raise ValueError(f"{path} holds no student.pt; pass a train-student run directory or a weights file")
    cfg = _run_config(run_dir)
    spec: dict[str, Any] = {k: cfg.get(k) for k in _SIZES}
    model = model or cfg.get("model")
    spec.update({k: v for k, v in overrides.items() if v is not None})
    if num_classes is None:
        head = read_state_dict(weights).get("head.weight")
        if head is None or head.ndim != 2:
            raise ValueError(f"{weights} holds no 'head.weight' to take the class count from; "
                             "pass --num-classes N")
        num_classes = int(head.shape[0])
    net = create_student(model or "deit_tiny_distilled_patch16_224", num_classes=num_classes,
                         **{k: v for k, v in spec.items() if v is not None})
    return load_checkpoint(net, weights).eval()


def evaluate_student(*, checkpoint: str, data: str, model: str | None = None, num_classes: int | None = None,
                     batch_size: int = 256, strict: bool = False, **overrides: Any) -> dict[str, Any]:
    """Top-1/top-5 of each head on ``data``, and agreement with the teacher on shards.

    Args:
        checkpoint, model, num_classes, **overrides: as :func:`resolve_student`.
        data: an ImageFolder, label-teacher shards or ``digits:val``.
        batch_size: images per forward pass.
        strict: raise at the first image that does not decode instead of skipping it.
    Returns:
        Metrics in percent plus "n" (images evaluated), "checkpoint", "data" and "skipped"
        (``[{"path", "reason"}]`` of the images that did not decode).
    """
    net = resolve_student(checkpoint, model=model, num_classes=num_classes, **overrides)
    img_size = net.config.img_size
    items, _ = eval_items(data)
    if not items:
        raise ValueError(f"--data {data}: no images to evaluate")
    dataset = EvalImages(items, img_size=img_size, skip_undecodable=not strict)
    skipped: list[dict[str, str]] = []
    batches = dataset.decodable(DataLoader(dataset, batch_size=batch_size), skipped)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        metrics = evaluate(net.to(device), batches, device=device, num_classes=net.num_classes)
    except ImageDecodeError as exc:
        raise ValueError(f"--data {data}: {exc} (--strict stops at the first undecodable image; "
                         "without it they are skipped)") from exc
    if metrics["n"] == 0:
        first = skipped[0] if skipped else {"path": data, "reason": "no images"}
        raise ValueError(f"--data {data}: none of its {len(items)} images decodes "
                         f"(first: {first['path']}: {first['reason']})")
    return {"checkpoint": str(checkpoint), "data": data, **metrics, "skipped": skipped}


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small table: one row per head, then the skipped images (ten at most)."""
    heads = [("class head", "cls"), ("distillation head", "dist"), ("average", "avg")]
    if "top1" in result:  # a plain, non-distilled model
        heads = [("head", None)]
    skipped = result.get("skipped", [])
    lines = [f"{result['checkpoint']} on {result['data']} ({int(result['n'])} images"
             f"{f', {len(skipped)} skipped' if skipped else ''})",
             f"{'':<18} {'top-1':>7} {'top-5':>7} {'agree teacher':>14}"]
    for label, key in heads:
        suffix = f"_{key}" if key else ""
        cells = [result.get(f"top1{suffix}"), result.get(f"top5{suffix}"), result.get(f"agree_teacher{suffix}")]
        lines.append(f"{label:<18} " + " ".join(f"{c:>7.2f}" if c is not None else f"{'-':>7}" for c in cells[:2])
                     + (f" {cells[2]:>14.2f}" if cells[2] is not None else f" {'-':>14}"))
    lines += [f"  skipped {item['path']}: {item['reason']}" for item in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"  ... and {len(skipped) - 10} more (--json lists them all)")
    return "\n".join(lines)

"""``deitpipe evaluate``: a trained student on held-out data, head by head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from deitpipe.student import create_student, evaluate, load_checkpoint, read_state_dict
from deitpipe.student.data import EvalImages, eval_items


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
    """
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    weights = path / "student.pt" if path.is_dir() else path
    spec: dict[str, Any] = {}
    if (run_dir / "config.json").exists():
        cfg = json.loads((run_dir / "config.json").read_text())
        spec = {k: cfg.get(k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
        model = model or cfg["model"]
    spec.update({k: v for k, v in overrides.items() if v is not None})
    if num_classes is None:
        state = read_state_dict(weights)
        num_classes = int(state["head.weight"].shape[0])
    net = create_student(model or "deit_tiny_distilled_patch16_224", num_classes=num_classes,
                         **{k: v for k, v in spec.items() if v is not None})
    return load_checkpoint(net, weights).eval()


def evaluate_student(*, checkpoint: str, data: str, model: str | None = None, num_classes: int | None = None,
                     batch_size: int = 256, **overrides: Any) -> dict[str, Any]:
    """Top-1/top-5 of each head on ``data``, and agreement with the teacher on shards.

    Returns:
        Metrics in percent plus "n", "checkpoint" and "data".
    """
    net = resolve_student(checkpoint, model=model, num_classes=num_classes, **overrides)
    img_size = net.config.img_size
    items, _ = eval_items(data)
    if not items:
        raise ValueError(f"--data {data}: no images to evaluate")
    loader = DataLoader(EvalImages(items, img_size=img_size, crop_pct=0.875 if img_size >= 128 else 1.0),
                        batch_size=batch_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(net.to(device), loader, device=device, num_classes=net.num_classes)
    return {"checkpoint": str(checkpoint), "data": data, **metrics}


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a small table: one row per head."""
    heads = [("class head", "cls"), ("distillation head", "dist"), ("average", "avg")]
    if "top1" in result:  # a plain, non-distilled model
        heads = [("head", None)]
    lines = [f"{result['checkpoint']} on {result['data']} ({int(result['n'])} images)",
             f"{'':<18} {'top-1':>7} {'top-5':>7} {'agree teacher':>14}"]
    for label, key in heads:
        suffix = f"_{key}" if key else ""
        cells = [result.get(f"top1{suffix}"), result.get(f"top5{suffix}"), result.get(f"agree_teacher{suffix}")]
        lines.append(f"{label:<18} " + " ".join(f"{c:>7.2f}" if c is not None else f"{'-':>7}" for c in cells[:2])
                     + (f" {cells[2]:>14.2f}" if cells[2] is not None else f" {'-':>14}"))
    return "\n".join(lines)

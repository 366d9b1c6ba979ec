"""Training and evaluation loops over batches of tensors, plus batch-level mixup / cutmix.

The engine knows tensors and modules only. A batch is a dict: ``"image"`` (B, 3, H, W) float,
``"label"`` (B,) int64 or (B, C) soft, and, when distilling, ``"teacher"`` (B, C) teacher
probabilities for that exact view. Other keys pass through untouched.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deitpipe.student.loss import split_outputs

Batch = dict[str, object]


class MixupCutmix:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a batch, teacher targets included.

    torchvision's ``v2.MixUp`` / ``v2.CutMix`` mix images and labels but neither exposes the
    lambda nor takes a third target, and the teacher's distribution must be mixed with the same
    lambda and partner as the labels (the teacher labelled the unmixed views). So this is a small
    re-implementation with their conventions: the partner of sample i is sample i - 1
    (``roll(1)``), one lambda per batch drawn from Beta(alpha, alpha), and cutmix's lambda
    corrected to the area actually pasted after clipping the box to the image.

    Args:
        num_classes: C, to turn int labels into one-hot rows.
        mixup_alpha: Beta parameter of mixup; 0 disables mixup.
        cutmix_alpha: Beta parameter of cutmix; 0 disables cutmix.
        switch_prob: probability of cutmix when both are enabled.
        prob: probability of mixing a batch at all.
        seed: seed of this instance's random draws (None: from the OS).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"--mixup and --cutmix must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not (0.0 <= switch_prob <= 1.0 and 0.0 <= prob <= 1.0):
            raise ValueError(f"--mixup-switch-prob and --mixup-prob must be in [0, 1], "
                             f"got {switch_prob}, {prob}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob, self.prob = switch_prob, prob
        self.rng = random.Random(seed)
        self.last_lam = 1.0  # lambda of the last call, for logging and tests

    def _choose(self) -> str | None:
        if self.rng.random() >= self.prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if self.rng.random() < self.switch_prob else "mixup"
        if self.cutmix_alpha > 0:
            return "cutmix"
        return "mixup" if self.mixup_alpha > 0 else None

    def _box(self, lam: float, height: int, width: int) -> tuple[int, int, int, int]:
        # A box of area (1 - lam) * H * W centred uniformly; clipping may shrink it.
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = self.rng.randrange(height), self.rng.randrange(width)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y1, y2, x1, x2

    def __call__(self, batch: Batch) -> Batch:
        """Mix a batch; returns a new dict, the input tensors are not modified.

        Args:
            batch: with "image" (B, 3, H, W), "label" (B,) or (B, C), optional "teacher" (B, C).
        Returns:
            The batch with mixed "image", (B, C) float "label" (one-hot when not mixed, so the
            type does not change from batch to batch) and mixed "teacher".
        """
        out = dict(batch)
        labels = batch["label"]
        if labels.ndim == 1:
            labels = F.one_hot(labels.long(), self.num_classes).float()
        out["label"] = labels
        kind = self._choose()
        self.last_lam = 1.0
        if kind is None:
            return out
        alpha = self.cutmix_alpha if kind == "cutmix" else self.mixup_alpha
        lam = self.rng.betavariate(alpha, alpha)
        images = batch["image"]
        if kind == "cutmix":
            y1, y2, x1, x2 = self._box(lam, images.shape[-2], images.shape[-1])
            images = images.clone()
            images[..., y1:y2, x1:x2] = batch["image"].roll(1, dims=0)[..., y1:y2, x1:x2]
            lam = 1.0 - (y2 - y1) * (x2 - x1) / (images.shape[-2] * images.shape[-1])
        else:
            images = images * lam + images.roll(1, dims=0) * (1.0 - lam)
        out["image"] = images
        out["label"] = labels * lam + labels.roll(1, dims=0) * (1.0 - lam)
        if batch.get("teacher") is not None:
            teacher = batch["teacher"]
            out["teacher"] = teacher * lam + teacher.roll(1, dims=0) * (1.0 - lam)
        self.last_lam = lam
        return out


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Tensors of a batch moved to ``device`` (non-blocking); other values kept as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    grad_clip: float | None,
    autocast_dtype: torch.dtype | None,
) -> dict[str, torch.Tensor]:
    with _autocast(device, autocast_dtype):
        cls_logits, dist_logits = split_outputs(model(batch["image"]))
    parts = loss_fn(cls_logits, dist_logits, batch["label"], batch.get("teacher"))
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: v.detach() for k, v in parts.items()}


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    online_teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mixup: MixupCutmix | None = None,
    max_steps: int | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: forward, loss, backward, step, per-iteration schedule, EMA.

    Loss parts are accumulated on the device and read once at the end, so the loop never waits
    for the accelerator.

    Args:
        model: the student; put in train mode here.
        loss_fn: a ``DistillationLoss`` (or anything with its call signature and dict result).
        loader: iterable of batch dicts (see the module docstring).
        optimizer: steps once per batch.
        device: where the model lives; batches are moved there.
        scheduler: stepped after every optimizer step.
        ema: ``AveragedModel`` updated after every optimizer step.
        grad_clip: max global gradient norm, or None.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under autocast.
        online_teacher: images -> (B, C) teacher probabilities, run under no_grad on the batch
            as the student sees it (after mixup); replaces the batch's "teacher". This is the
            paper's live-teacher setting, for comparison with stored labels.
        mixup: applied to each batch on the device before the teacher and the student.
        max_steps: stop after this many steps (e.g. the rest of a resumed epoch).
        progress: called as ``progress(step, {"lr", "images", **loss parts})`` after each step;
            the loss parts are device tensors, and reading them (``.item()``) synchronises.
    Returns:
        Per-image averages of every loss part, plus "lr" (of the last step), "images",
        "images_per_s" and "steps".
    """
    device = torch.device(device)
    model.train()
    sums: dict[str, torch.Tensor] = {}
    images = steps = 0
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        batch = to_device(batch, device)
        if mixup is not None:
            batch = mixup(batch)
        if online_teacher is not None:
            with torch.no_grad():
                batch["teacher"] = online_teacher(batch["image"]).float()
        lr = optimizer.param_groups[0]["lr"]
        parts = _train_step(model, loss_fn, batch, optimizer, device=device,
                            grad_clip=grad_clip, autocast_dtype=autocast_dtype)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        size = batch["image"].shape[0]
        for key, value in parts.items():
            sums[key] = sums[key] + value * size if key in sums else value * size
        images += size
        steps += 1
        if progress is not None:
            progress(steps, {"lr": lr, "images": images, **parts})
    return _epoch_summary(sums, images=images, steps=steps, lr=lr, start=start)


def _epoch_summary(
    sums: dict[str, torch.Tensor], *, images: int, steps: int, lr: float, start: float
) -> dict[str, float]:
    means = {k: (v / max(images, 1)).item() for k, v in sums.items()}  # the one sync
    elapsed = time.perf_counter() - start
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(
            f"training loss is not finite ({means}); lower the learning rate or set grad_clip"
        )
    return {**means, "lr": lr, "images": images, "steps": steps,
            "images_per_s": images / elapsed if elapsed > 0 else 0.0}


def head_logits(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each head's logits: {"cls", "dist", "avg"} for a distilled DeiT, {"": logits} otherwise.

    The distilled model's eval forward only returns the average, so the heads are read from
    ``forward_features`` directly (token 0 -> ``head``, token 1 -> ``head_dist``).
    """
    if getattr(model, "head_dist", None) is None or not hasattr(model, "forward_features"):
        cls_logits, _ = split_outputs(model(images))
        return {"": cls_logits}
    feats = model.forward_features(images)  # (B, 2 + N, D)
    cls_logits, dist_logits = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    return {"cls": cls_logits, "dist": dist_logits, "avg": (cls_logits + dist_logits) / 2}


def _hard(targets: torch.Tensor) -> torch.Tensor:
    return targets.argmax(dim=-1) if targets.ndim == 2 else targets.long()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device | str,
    num_classes: int,
    teacher_key: str | None = "teacher_hard",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of each head and its agreement with the teacher.

    Args:
        model: the student (or ``ema.module``); put in eval mode here.
        loader: batch dicts with "image" and "label"; when ``teacher_key`` is in a batch, its
            (B,) teacher class (or (B, C) distribution) is compared with each head's top-1.
        device: where the model lives.
        num_classes: C; top-5 is reported only when C >= 5.
        teacher_key: batch key of the teacher's hard label, or None to skip agreement.
        autocast_dtype: as in ``train_one_epoch``.
    Returns:
        Percentages "top1_{h}", "top5_{h}", "agree_teacher_{h}" for h in cls, dist, avg
        ("top1", "top5", "agree_teacher" for a single-head model), and "n" images. Agreement is
        over the images whose batch had the teacher key.
    """
    device = torch.device(device)
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    n = n_teacher = 0

    def add(key: str, value: torch.Tensor) -> None:
        counts[key] = counts[key] + value if key in counts else value

    for batch in loader:
        batch = to_device(batch, device)
        labels = _hard(batch["label"])
        teacher = batch.get(teacher_key) if teacher_key is not None else None
        with _autocast(device, autocast_dtype):
            heads = head_logits(model, batch["image"])
        for head, logits in heads.items():
            suffix = f"_{head}" if head else ""
            top = logits.float().topk(min(5, num_classes), dim=-1).indices  # (B, k)
            add("top1" + suffix, (top[:, 0] == labels).sum())
            if num_classes >= 5:
                add("top5" + suffix, (top == labels[:, None]).any(dim=-1).sum())
            if teacher is not None:
                add("agree_teacher" + suffix, (top[:, 0] == _hard(teacher)).sum())
        n += labels.shape[0]
        n_teacher += labels.shape[0] if teacher is not None else 0
    result = {k: 100.0 * v.item() / (n_teacher if k.startswith("agree") else n)
              for k, v in counts.items()}
    return {**result, "n": n}


__all__ = ["MixupCutmix", "evaluate", "head_logits", "to_device", "train_one_epoch"]

"""Training and evaluation loops over batches of tensors, plus batch-level mixup / cutmix.

The engine knows tensors and modules only. A batch is a dict: ``"image"`` (B, 3, H, W) float,
``"label"`` (B,) int64 or (B, C) soft, and, when distilling, ``"teacher"`` (B, C) teacher
probabilities for that exact view. Other keys pass through untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from deitpipe.student.loss import split_outputs

Batch = dict[str, object]


class MixupCutmix:
    """timm's batch Mixup / CutMix (as DeiT trains), mixing the teacher targets with the labels.

    The teacher labelled the unmixed views, so its distribution must be mixed with the same lambda
    and partner as the images and labels. timm mixes the images in place (partner of sample i:
    sample B - 1 - i, ``flip(0)``; one lambda per batch; cutmix's lambda corrected to the area
    pasted after clipping) and returns the mixed one-hot targets. Handing it the identity as the
    targets (sample i is "class" i of B) returns the (B, B) mixing matrix, whose diagonal is each
    sample's own weight; labels and teacher are mixed with it and the ``flip(0)`` partner.

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
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"--mixup-switch must be in [0, 1], got {switch_prob}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.num_classes = num_classes
        self.active = prob > 0 and (mixup_alpha > 0 or cutmix_alpha > 0)
        # label_smoothing 0: the loss smooths the labels. num_classes is set to B on each call.
        self._mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                            switch_prob=switch_prob, mode="batch", correct_lam=True,
                            label_smoothing=0.0, num_classes=num_classes)
        # timm draws from numpy's global RNG (np.random.rand / beta / randint); each call swaps
        # this instance's own state in and out, so a seed fixes its draws and others' are kept.
        self._np_state = np.random.RandomState(np.random.MT19937(seed)).get_state()
        self._lam: torch.Tensor | float = 1.0

    @property
    def last_lam(self) -> float:
        """Lambda of the last call (weight of each sample's own image), for logging and tests."""
        return float(self._lam)  # reading a device tensor synchronises: only on request

    def _mix(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's mixing of ``images`` (in place) and the (B, B) mixing matrix, seeded."""
        size = images.shape[0]
        identity = torch.arange(size, device=images.device)
        self._mixup.num_classes = size
        outer = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            return self._mixup(images, identity)
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outer)

    def __call__(self, batch: Batch) -> Batch:
        """Mix a batch; returns a new dict, the input tensors are not modified.

        Args:
            batch: with "image" (B, 3, H, W), "label" (B,) or (B, C), optional "teacher" (B, C);
                B even, as timm pairs sample i with sample B - 1 - i.
        Returns:
            The batch with mixed "image", (B, C) float "label" (one-hot when not mixed, so the
            type does not change from batch to batch) and mixed "teacher".
        """
        out = dict(batch)
        labels = batch["label"]
        if labels.ndim == 1:
            labels = F.one_hot(labels.long(), self.num_classes).float()
        out["label"] = labels
        self._lam = 1.0
        if not self.active:
            return out
        if labels.shape[0] % 2:
            raise ValueError(f"mixup/cutmix pairs sample i with sample B-1-i and needs an even batch, got "
                             f"{labels.shape[0]}; choose an even --batch-size, or set --mixup 0 --cutmix 0")
        out["image"], matrix = self._mix(batch["image"].clone())
        lam = matrix.diagonal().unsqueeze(1)  # (B, 1): sample i's own weight, 1 when not mixed
        out["label"] = labels * lam + labels.flip(0) * (1.0 - lam)
        if batch.get("teacher") is not None:
            teacher = batch["teacher"]
            out["teacher"] = (teacher * lam + teacher.flip(0) * (1.0 - lam)).to(teacher.dtype)
        self._lam = lam[0, 0]
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

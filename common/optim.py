"""AdamW with DeiT's weight-decay split, the linear batch-size rule, and warmup + cosine.

DeiT's recipe: lr = 5e-4 * global_batch / 512, AdamW (weight decay 0.05, none on norms, biases
and the tokens / position embedding), 5 warmup epochs from 1e-6, then cosine down to 1e-5.
The schedule here is stepped every iteration rather than every epoch, which is smoother for
the short runs the embedded data allows and is what timm does with ``t_in_epochs=False``.

Both stages train with these pieces: the student with AdamW, the convnet teacher with the same
decay split, AdamW or Nesterov SGD (``build_optimizer(kind="sgd")``), the same schedule builder
and :func:`bf16_autocast`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REFERENCE_BATCH = 512  # DeiT's linear scaling rule is written for a batch of 512
OPTIMIZER_KINDS = ("adamw", "sgd")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """DeiT's linear rule: ``base_lr * global_batch / 512``.

    Args:
        base_lr: learning rate for a global batch of 512 (DeiT: 5e-4).
        global_batch: images per optimizer step over all ranks.
    Returns:
        The learning rate to use.
    """
    if global_batch < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch}")
    return base_lr * global_batch / REFERENCE_BATCH


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decayed weights, and parameters that should not decay.

    Not decayed: every parameter with fewer than two dimensions (norm scales, biases) and the
    names in ``model.no_weight_decay()`` (for DeiT: pos_embed, cls_token, dist_token).

    Args:
        model: the student or teacher; frozen parameters (requires_grad False) are left out.
        weight_decay: decay of the first group.
    Returns:
        ``[{"params": [...], "weight_decay": wd, "names": [...]}, {... 0.0 ...}]``.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    kind: str = "adamw",
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """AdamW (or SGD) over ``param_groups(model)``.

    Args:
        model: the student or teacher.
        lr: peak learning rate (already scaled, see ``scaled_lr``).
        weight_decay: weight decay of matrices and conv kernels (decoupled for AdamW, L2 for SGD).
        betas: Adam's moment coefficients (AdamW only).
        kind: "adamw" or "sgd".
        momentum: SGD's momentum (SGD only).
        nesterov: Nesterov momentum (SGD only).
    Returns:
        The optimizer; each group keeps its parameter ``names`` for inspection.
    """
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {weight_decay}")
    if kind not in OPTIMIZER_KINDS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_KINDS)}, got {kind!r}")
    groups = param_groups(model, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    # The fused kernel is one launch for all parameters on CUDA; foreach elsewhere.
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(
    step: int, *, peak: float, total: int, warmup: int, warmup_lr: float, min_lr: float
) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine to ``min_lr``.

    Args:
        step: optimizer steps taken so far (0 before the first).
        peak: learning rate reached at the end of warmup.
        total: steps of the whole run.
        warmup: warmup steps (0 starts at the peak).
        warmup_lr: learning rate at step 0.
        min_lr: floor reached at ``total`` and kept afterwards.
    Returns:
        The learning rate, absolute.
    """
    if step < warmup:
        return warmup_lr + (peak - warmup_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    min_lr: float = 1e-5,
    warmup_lr: float = 1e-6,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + cosine schedule; call ``scheduler.step()`` after every step.

    ``min_lr`` and ``warmup_lr`` are absolute learning rates (DeiT's 1e-5 and 1e-6, which DeiT
    does not scale with the batch), each capped at the group's peak so that a small peak never
    makes the "decay" rise. A ``LambdaLR`` keeps the schedule a pure function of the step count,
    so ``state_dict`` / ``load_state_dict`` resume it exactly.

    Args:
        optimizer: its groups' current ``lr`` is the peak of each group.
        epochs: total epochs of the run.
        steps_per_epoch: optimizer steps per epoch.
        warmup_epochs: epochs of linear warmup (may be fractional; 0 for none).
        min_lr: absolute floor at the end of the run.
        warmup_lr: absolute learning rate of the first step.
    Returns:
        The scheduler.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"--epochs and steps per epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"--warmup-epochs must be in [0, --epochs={epochs}], got {warmup_epochs}")
    if min_lr < 0 or warmup_lr < 0:
        raise ValueError(f"--min-lr and --warmup-lr must be >= 0, got {min_lr}, {warmup_lr}")
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)

    def factor_for(peak: float):
        # LambdaLR multiplies the group's initial lr, so turn the absolute lr into a factor.
        floor, start = min(min_lr, peak), min(warmup_lr, peak)
        return lambda step: warmup_cosine(step, peak=peak, total=total, warmup=warmup,
                                          warmup_lr=start, min_lr=floor) / peak

    peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(p) for p in peaks])


def bf16_autocast(device: torch.device | str) -> torch.autocast:
    """Autocast to bfloat16 on CUDA; disabled elsewhere.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; the CPU stays in fp32 so
    that runs there are bit-for-bit reproducible.

    Args:
        device: where the forward pass runs.
    Returns:
        The autocast context manager.
    """
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


__all__ = ["OPTIMIZER_KINDS", "REFERENCE_BATCH", "bf16_autocast", "build_optimizer", "build_scheduler",
           "param_groups", "scaled_lr", "warmup_cosine"]

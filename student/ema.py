"""Exponential moving average of the student's weights (DeiT's ``--model-ema``).

torch's ``AveragedModel`` with an EMA update does the work; it keeps its own copy of the model,
averages buffers too, and its ``state_dict`` (weights plus ``n_averaged``) goes into checkpoints.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

DEIT_EMA_DECAY = 0.99996


def build_ema(model: nn.Module, *, decay: float = DEIT_EMA_DECAY) -> AveragedModel:
    """An EMA copy of ``model``; call ``ema.update_parameters(model)`` after each step.

    The first update copies the weights; later ones do ``ema = decay * ema + (1 - decay) * w``.
    Evaluate ``ema.module``.

    Args:
        model: the student being trained.
        decay: EMA decay per step, in [0, 1).
    Returns:
        The averaged model, on the same device as ``model``.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


__all__ = ["DEIT_EMA_DECAY", "build_ema"]

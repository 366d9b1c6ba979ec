"""The DeiT student: model, distillation loss, view replay, training engine and evaluation.

The public names load on first use (PEP 562), so importing ``deitpipe.student.config`` (which
the command line does for its options) does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "load_checkpoint": "checkpoint", "read_state_dict": "checkpoint", "resample_pos_embed": "checkpoint",
    "build_ema": "ema", "MixupCutmix": "engine", "evaluate": "engine", "train_one_epoch": "engine",
    "DistillationLoss": "loss", "VARIANTS": "model", "DeiT": "model", "DeiTConfig": "model",
    "create_student": "model", "build_optimizer": "optim", "build_scheduler": "optim", "scaled_lr": "optim",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'deitpipe.student' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deitpipe.student.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

"""The DeiT student: model, distillation loss, view replay, training engine and evaluation.

The public names load on first use (PEP 562), so importing ``deitpipe.student.config`` (which
the command line does for its options) does not import torch and timm.
"""

from __future__ import annotations

from deitpipe import lazy_names

_WHERE = {
    "load_checkpoint": "checkpoint", "read_state_dict": "checkpoint", "resample_pos_embed": "checkpoint",
    "build_ema": "ema", "MixupCutmix": "engine", "evaluate": "engine", "train_one_epoch": "engine",
    "DistillationLoss": "loss", "VARIANTS": "model", "DeiT": "model", "DeiTConfig": "model",
    "create_student": "model", "build_optimizer": "optim", "build_scheduler": "optim", "scaled_lr": "optim",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)

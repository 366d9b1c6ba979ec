"""The student's optimizer, schedule and autocast: DeiT's recipe, shared with the teacher.

DeiT's recipe: lr = 5e-4 * global_batch / 512, AdamW (weight decay 0.05, none on norms, biases
and the tokens / position embedding), 5 warmup epochs from 1e-6, then cosine down to 1e-5,
stepped every iteration.

The convnet teacher trains with the same pieces, so they are defined once below both stages, in
:mod:`deitpipe.common.optim`; this module keeps the student's names for them.
"""

from __future__ import annotations

from deitpipe.common.optim import (
    OPTIMIZER_KINDS,
    REFERENCE_BATCH,
    bf16_autocast,
    build_optimizer,
    build_scheduler,
    param_groups,
    scaled_lr,
    warmup_cosine,
)

__all__ = ["OPTIMIZER_KINDS", "REFERENCE_BATCH", "bf16_autocast", "build_optimizer", "build_scheduler",
           "param_groups", "scaled_lr", "warmup_cosine"]

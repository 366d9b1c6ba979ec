"""The DeiT student: model, distillation loss, view replay, training engine and evaluation."""

from deitpipe.student.checkpoint import load_checkpoint, read_state_dict, resample_pos_embed
from deitpipe.student.model import VARIANTS, DeiT, DeiTConfig, create_student

__all__ = ["DeiT", "DeiTConfig", "VARIANTS", "create_student", "load_checkpoint",
           "read_state_dict", "resample_pos_embed"]

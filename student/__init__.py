"""The DeiT student: model, distillation loss, view replay, training engine and evaluation."""

from deitpipe.student.checkpoint import load_checkpoint, read_state_dict, resample_pos_embed
from deitpipe.student.ema import build_ema
from deitpipe.student.engine import MixupCutmix, evaluate, train_one_epoch
from deitpipe.student.loss import DistillationLoss
from deitpipe.student.model import VARIANTS, DeiT, DeiTConfig, create_student
from deitpipe.student.optim import build_optimizer, build_scheduler, scaled_lr

__all__ = ["DeiT", "DeiTConfig", "VARIANTS", "create_student", "load_checkpoint",
           "read_state_dict", "resample_pos_embed", "DistillationLoss", "build_optimizer",
           "build_scheduler", "scaled_lr", "build_ema", "MixupCutmix", "evaluate",
           "train_one_epoch"]

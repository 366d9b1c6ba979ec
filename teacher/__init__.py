"""Convnet teachers: construction, weight loading, preprocessing and batched prediction.

The public names load on first use (PEP 562), so importing ``deitpipe.teacher.config`` (which
the command line does for its options) does not import torch and torchvision.
"""

from __future__ import annotations

from deitpipe import lazy_names

_WHERE = {
    "TeacherInfo": "models", "build_teacher": "models", "file_sha256": "models", "hub_cache_file": "models",
    "load_state_dict_file": "models",
    "TeacherOutputs": "predict", "TeacherPredictor": "predict", "predict_probs": "predict",
    "resolve_device": "predict", "summarize_probs": "predict",
    "Preprocessing": "preprocess", "check_teacher_name": "preprocess", "check_weights_out": "preprocess",
    "default_preprocessing": "preprocess", "default_weights": "preprocess", "is_own_sidecar": "preprocess",
    "normalize": "preprocess", "preprocessing_from_weights": "preprocess",
    "read_sidecar": "preprocess", "resolve_preprocessing": "preprocess", "sidecar_path": "preprocess",
    "teacher_names": "preprocess", "write_sidecar": "preprocess",
    "TeacherTrainConfig": "config", "evaluate_teacher": "train", "train_teacher": "train",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)

"""Convnet teachers: construction, weight loading, preprocessing and batched prediction."""

from deitpipe.teacher.models import (
    TeacherInfo,
    build_teacher,
    file_sha256,
    hub_cache_file,
    load_state_dict_file,
)
from deitpipe.teacher.predict import (
    TeacherOutputs,
    TeacherPredictor,
    predict_probs,
    resolve_device,
    summarize_probs,
)
from deitpipe.teacher.preprocess import (
    Preprocessing,
    check_teacher_name,
    default_preprocessing,
    default_weights,
    normalize,
    preprocessing_from_weights,
    read_sidecar,
    resolve_preprocessing,
    sidecar_path,
    teacher_names,
    write_sidecar,
)
from deitpipe.teacher.train import TeacherTrainConfig, evaluate_teacher, train_teacher

__all__ = [
    "TeacherTrainConfig",
    "evaluate_teacher",
    "train_teacher",
    "Preprocessing",
    "TeacherInfo",
    "TeacherOutputs",
    "TeacherPredictor",
    "build_teacher",
    "check_teacher_name",
    "default_preprocessing",
    "default_weights",
    "file_sha256",
    "hub_cache_file",
    "load_state_dict_file",
    "normalize",
    "predict_probs",
    "preprocessing_from_weights",
    "read_sidecar",
    "resolve_device",
    "resolve_preprocessing",
    "sidecar_path",
    "summarize_probs",
    "teacher_names",
    "write_sidecar",
]

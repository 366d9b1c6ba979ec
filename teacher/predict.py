"""Batched teacher prediction and the compact form its outputs are stored in.

Per view the teacher's softmax is kept as its argmax (``hard``), its top-k classes (``topk``,
by falling probability), their probabilities (``prob``, float16) and the leftover mass
(``rest`` = 1 - sum of the stored ``prob``), or in full (``softmax``, float16).

:class:`TeacherPredictor` is a callable class over numpy batches, the shape Ray Data's
``map_batches`` wants for stateful actors: the model is built once per actor in ``__init__``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deitpipe.common.optim import bf16_autocast
from deitpipe.shards.format.schema import class_dtype
from deitpipe.teacher.models import build_teacher
from deitpipe.teacher.preprocess import Preprocessing, normalize

PIXELS = "pixels"
HARD, TOPK, PROB, REST, SOFTMAX = "hard", "topk", "prob", "rest", "softmax"


@dataclass(frozen=True)
class TeacherOutputs:
    """The stored form of a batch of teacher softmaxes.

    Attributes:
        hard: (N,) int64 argmax of the float32 softmax.
        topk: (N, K) class indices by falling probability.
        prob: (N, K) float16 probabilities of ``topk``.
        rest: (N,) float16, max(0, 1 - sum of ``prob`` as stored).
        softmax: (N, C) float16 full softmax, or None.
    """

    hard: np.ndarray
    topk: np.ndarray
    prob: np.ndarray
    rest: np.ndarray
    softmax: np.ndarray | None = None

    def columns(self) -> dict[str, np.ndarray]:
        """Column name -> array; ``softmax`` only when it was kept."""
        out = {HARD: self.hard, TOPK: self.topk, PROB: self.prob, REST: self.rest}
        if self.softmax is not None:
            out[SOFTMAX] = self.softmax
        return out


def summarize_probs(
    probs: torch.Tensor, *, topk: int, full_softmax: bool, index_dtype: Any = np.int64
) -> TeacherOutputs:
    """Reduce softmax rows to argmax, top-k and leftover mass.

    Args:
        probs: (N, C) float32 softmax rows.
        topk: classes kept per row; clamped to C.
        full_softmax: also keep the whole row as float16.
        index_dtype: numpy integer dtype of ``topk`` (e.g. the shard schema's class dtype).

    Returns:
        The :class:`TeacherOutputs`; stored ``prob`` plus ``rest`` sums to 1 up to float16
        rounding.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    num_classes = probs.shape[1]
    if np.iinfo(index_dtype).max < num_classes - 1:
        raise ValueError(f"index dtype {np.dtype(index_dtype)} cannot hold {num_classes} classes")
    probs = probs.detach().float().cpu()
    values, indices = probs.topk(min(topk, num_classes), dim=-1, largest=True, sorted=True)
    stored = values.to(torch.float16)  # (N, K)
    # Leftover mass from the float32 probabilities: from the float16 ones it would round to 0
    # for a confident row (top-1 >= ~0.9998) and the tail a soft target needs would be lost.
    # Readers renormalise, so float16 rounding of the stored top-k costs nothing.
    rest = (1.0 - values.sum(dim=-1)).clamp_min(0.0).to(torch.float16)  # (N,)
    return TeacherOutputs(
        hard=probs.argmax(dim=-1).numpy().astype(np.int64),
        topk=indices.numpy().astype(index_dtype),
        prob=stored.numpy(),
        rest=rest.numpy(),
        softmax=probs.to(torch.float16).numpy() if full_softmax else None,
    )


def predict_probs(
    model: nn.Module,
    pixels_uint8: np.ndarray | torch.Tensor,
    prep: Preprocessing,
    *,
    device: torch.device | str,
    batch_size: int,
) -> torch.Tensor:
    """Softmax of a teacher over uint8 crops (or float crops in [0, 1] units), in chunks.

    Args:
        model: the teacher in eval mode, already on ``device``.
        pixels_uint8: (N, 3, S, S) uint8 RGB crops at the teacher's input size, or float32.
        prep: the teacher's preprocessing (mean and std).
        device: where the forward runs; CUDA runs under bfloat16 autocast, CPU in float32.
        batch_size: rows per forward pass.

    Returns:
        (N, C) float32 softmax on the CPU; (0, 0) when N is 0.
    """
    device = torch.device(device)
    pixels = _as_tensor(pixels_uint8)
    on_cuda = device.type == "cuda"
    chunks = []
    with torch.inference_mode(), bf16_autocast(device):
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start : start + batch_size]
            if on_cuda and not chunk.is_cuda:
                chunk = chunk.pin_memory()  # lets the host-to-device copy run asynchronously
            logits = model(normalize(chunk, prep, device))  # (B, C)
            # Softmax in float32 whatever autocast produced: small probabilities matter for KD.
            chunks.append(logits.float().softmax(dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _as_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return pixels
    if pixels.dtype == object:  # Ray hands same-shape tensors over as an object array at times
        pixels = np.stack(list(pixels))
    if not pixels.flags.writeable:  # Arrow-backed batches are read-only; torch wants writable
        pixels = pixels.copy()
    return torch.from_numpy(np.ascontiguousarray(pixels))


def resolve_device(device: str) -> torch.device:
    """Map "auto" | "cpu" | "cuda" (or "cuda:N") to a device, checking CUDA is there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but none is available; use auto or cpu")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return resolved


class TeacherPredictor:
    """Labels batches of view crops with a teacher; a Ray Data actor class.

    Input batches hold "pixels", (N, 3, S, S) uint8, and any other columns, which are passed
    through unchanged; "pixels" itself is dropped. Output adds "hard", "topk", "prob", "rest"
    and, with ``full_softmax``, "softmax" (see :class:`TeacherOutputs`; ``topk`` uses the shard
    schema's class dtype).
    """

    def __init__(
        self,
        *,
        name: str,
        weights_path: str | os.PathLike | None = None,
        num_classes: int | None = None,
        preprocessing_overrides: Mapping[str, Any] | None = None,
        topk: int = 5,
        full_softmax: bool = False,
        device: str = "auto",
        batch_size: int = 256,
        allow_download: bool = False,
    ) -> None:
        """Build the teacher once; arguments as in :func:`build_teacher` plus:

        Args:
            topk: classes kept per view.
            full_softmax: also keep the full float16 softmax.
            device: "auto" (CUDA when available), "cpu" or "cuda".
            batch_size: views per forward pass.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        model, self.info = build_teacher(
            name,
            weights_path=weights_path,
            num_classes=num_classes,
            allow_download=allow_download,
            preprocessing_overrides=preprocessing_overrides,
        )
        # channels_last is the fast convolution layout for cuDNN and oneDNN alike.
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # view crops have one fixed size
        self.topk = topk
        self.full_softmax = full_softmax
        self.batch_size = batch_size
        self.index_dtype = class_dtype(self.info.num_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Label one batch.

        Args:
            batch: column name -> array, with "pixels" (N, 3, S, S) uint8.

        Returns:
            The other columns unchanged plus the teacher output columns.
        """
        if PIXELS not in batch:
            raise KeyError(f"teacher batches need a {PIXELS!r} column, got {sorted(batch)}")
        passed = {k: v for k, v in batch.items() if k != PIXELS}
        return {**passed, **self.summarize(self.probs(batch[PIXELS]))}

    def probs(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, C) float32 softmax on the CPU of (N, 3, S, S) uint8 crops, or float crops in [0, 1]
        units (rendered views: mixed, erased), at the teacher's input size."""
        if len(pixels) == 0:
            return torch.empty(0, self.info.num_classes)
        return predict_probs(self.model, pixels, self.info.preprocessing, device=self.device,
                             batch_size=self.batch_size)

    def summarize(self, probs: torch.Tensor) -> dict[str, np.ndarray]:
        """The output columns ("hard", "topk", "prob", "rest"[, "softmax"]) of (N, C) softmax."""
        return summarize_probs(probs, topk=self.topk, full_softmax=self.full_softmax,
                               index_dtype=self.index_dtype).columns()

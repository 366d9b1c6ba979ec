"""The shard schema, defined once: member names, dtypes and the schema version.

A shard is a plain WebDataset tar. Each sample ``KEY`` (no dots; ``s`` + 9 digits of its index in
the sorted input list; shards mix inputs in a seeded order) has these members (version 2):

===================  =====================  =================================================
member               content                shape / dtype
===================  =====================  =================================================
``KEY.<ext>``        original image bytes   ext is the real type: jpg, png, webp, gif, bmp, tiff
``KEY.cls``          true label             ASCII decimal int
``KEY.json``         source metadata        {"path", "height", "width"} (after EXIF transpose)
``KEY.views.npy``    per-view geometry and  (V + 1,) structured array, :func:`views_dtype`
                     teacher outputs
===================  =====================  =================================================

The fields of ``views.npy`` (packed, little-endian, in this order):

===========  ======================  =====================================================
field        content                 shape / dtype per row
===========  ======================  =====================================================
``box``      view crop box           (4,) int32: top, left, height, width
``flip``     horizontal flip         uint8
``hard``     teacher argmax          uint16 (int32 above 65,536 classes)
``topk``     top-k class indices     (K,) same dtype as hard, by falling prob
``prob``     top-k probabilities     (K,) float16
``rest``     leftover mass           float16: 1 - sum of the stored top-k
``softmax``  full softmax            (C,) float16, only with --full-softmax
===========  ======================  =====================================================

Version 1 stored each field as its own member, ``KEY.<field>.npy`` with shape (V + 1, ...) and the
same dtype; readers still read it (``V1_VIEW_MEMBERS``). In a tar every member costs a 512-byte
header and padding to 512 bytes, so one member per sample instead of six or seven is what
version 2 saves.

Row 0 is the global view (the teacher's eval transform: resize and centre crop, expressed as a
box in source pixels); rows 1..V are the random views. Boxes are in source-image pixels after
EXIF transpose and RGB conversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_PATTERN = "s{:09d}"

CLS = "cls"  # absent from a sample that has no true label (label-teacher --unlabeled)
UNLABELED = -1  # a reader's label for such a sample
META = "json"
VIEWS = "views.npy"  # version 2: every per-view field in one structured array

# Per-view fields, in the order they are stored; "softmax" is optional.
VIEW_FIELDS = ("box", "flip", "hard", "topk", "prob", "rest")
SOFTMAX_FIELD = "softmax"

# Version 1: one member per field, in the order they were written.
BOX = "box.npy"
FLIP = "flip.npy"
HARD = "hard.npy"
TOPK = "topk.npy"
PROB = "prob.npy"
REST = "rest.npy"
SOFTMAX = "softmax.npy"
V1_VIEW_MEMBERS = (BOX, FLIP, HARD, TOPK, PROB, REST)

# Image types stored under their real extension, detected from content.
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp", "tiff")

BOX_DTYPE = np.int32
FLIP_DTYPE = np.uint8
PROB_DTYPE = np.float16


def class_dtype(num_classes: int) -> type:
    """Dtype of class indices (``hard``, ``topk``): uint16 up to 65,536 classes, else int32."""
    return np.uint16 if num_classes <= 65536 else np.int32


def views_dtype(num_classes: int, topk: int, full_softmax: bool, *, index_dtype: Any = None) -> np.dtype:
    """The structured dtype of one row of ``views.npy`` (version 2).

    Packed (no alignment padding) and little-endian, so its ``itemsize`` is the payload of one
    view and the bytes are the same on every machine.

    Args:
        num_classes: Number of classes C (the ``softmax`` width; picks the class-index dtype).
        topk: Classes stored per view, K.
        full_softmax: Whether the row holds the full float16 softmax.
        index_dtype: Dtype of ``hard``/``topk`` when it is not ``class_dtype(num_classes)``
            (uint16 or int32).

    Returns:
        The dtype, fields in ``VIEW_FIELDS`` order then ``softmax``.
    """
    index = np.dtype(index_dtype if index_dtype is not None else class_dtype(num_classes)).newbyteorder("<")
    prob = np.dtype(PROB_DTYPE).newbyteorder("<")
    fields = [("box", np.dtype(BOX_DTYPE).newbyteorder("<"), (4,)), ("flip", np.dtype(FLIP_DTYPE)),
              ("hard", index), ("topk", index, (topk,)), ("prob", prob, (topk,)), ("rest", prob)]
    if full_softmax:
        fields.append((SOFTMAX_FIELD, prob, (num_classes,)))
    return np.dtype(fields)


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(index: int) -> str:
    return KEY_PATTERN.format(index)


def bytes_per_view(num_classes: int, topk: int, full_softmax: bool) -> int:
    """Payload bytes of one view's geometry and teacher outputs (without tar/npy headers)."""
    return views_dtype(num_classes, topk, full_softmax).itemsize

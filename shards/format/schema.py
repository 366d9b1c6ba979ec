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
``ra_op``    RandAugment ops         (2,) uint8 index into timm's op list; 255: not applied
``ra_level`` their levels            (2,) uint8: level x 25 (0..250 for 0..10)
``ra_sign``  their signs             uint8: bit k set where op k's argument is negated
``erase``    erased box              (4,) uint16 top, left, height, width; height 0: none
``noise``    erasing fill seed       uint32: torch.Generator seed of the N(0, 1) fill
``mix_key``  mixing partner          uint32: its key number (same shard); 2**32 - 1: none
``mix_view`` partner's view          uint16: its row
``lam``      own weight              float16: mixup's lambda, CutMix's kept area
``cut``      CutMix box              (4,) uint16 top, left, height, width; height 0: blend
``softmax``  full softmax            (C,) float16, only with --full-softmax
===========  ======================  =====================================================

``ra_op`` to ``cut`` are in version 3 only, written when label-teacher draws augmentation
(``shards.format.augment``): boxes there are in the pixels of the cut view (the manifest's
``augment.size``), and the teacher's outputs are its answer on the view after all of it.
Without augmentation label-teacher writes version 2, as before.

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

SCHEMA_VERSION = 2  # what a label set without stored augmentation is written in
AUGMENTED_VERSION = 3  # views.npy rows also hold each view's augmentation record
READABLE_VERSIONS = (1, 2, 3)

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
# Version 3: each view's augmentation record (``shards.format.augment``), between rest and softmax.
AUG_FIELDS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("ra_op", "u1", (2,)), ("ra_level", "u1", (2,)), ("ra_sign", "u1", ()),
    ("erase", "<u2", (4,)), ("noise", "<u4", ()),
    ("mix_key", "<u4", ()), ("mix_view", "<u2", ()), ("lam", "<f2", ()), ("cut", "<u2", (4,)),
)
AUG_FIELD_NAMES = tuple(name for name, _, _ in AUG_FIELDS)

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


def views_dtype(num_classes: int, topk: int, full_softmax: bool, *, index_dtype: Any = None,
                augment: bool = False) -> np.dtype:
    """The structured dtype of one row of ``views.npy`` (version 2; version 3 with ``augment``).

    Packed (no alignment padding) and little-endian, so its ``itemsize`` is the payload of one
    view and the bytes are the same on every machine.

    Args:
        num_classes: Number of classes C (the ``softmax`` width; picks the class-index dtype).
        topk: Classes stored per view, K.
        full_softmax: Whether the row holds the full float16 softmax.
        index_dtype: Dtype of ``hard``/``topk`` when it is not ``class_dtype(num_classes)``
            (uint16 or int32).
        augment: Whether the row holds the augmentation record (``AUG_FIELDS``, version 3).

    Returns:
        The dtype, fields in ``VIEW_FIELDS`` order, then ``AUG_FIELDS``, then ``softmax``.
    """
    index = np.dtype(index_dtype if index_dtype is not None else class_dtype(num_classes)).newbyteorder("<")
    prob = np.dtype(PROB_DTYPE).newbyteorder("<")
    fields = [("box", np.dtype(BOX_DTYPE).newbyteorder("<"), (4,)), ("flip", np.dtype(FLIP_DTYPE)),
              ("hard", index), ("topk", index, (topk,)), ("prob", prob, (topk,)), ("rest", prob)]
    if augment:
        fields += [(name, np.dtype(kind), shape) for name, kind, shape in AUG_FIELDS]
    if full_softmax:
        fields.append((SOFTMAX_FIELD, prob, (num_classes,)))
    return np.dtype(fields)


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(index: int) -> str:
    return KEY_PATTERN.format(index)


def bytes_per_view(num_classes: int, topk: int, full_softmax: bool, *, augment: bool = False) -> int:
    """Payload bytes of one view's geometry, teacher outputs and, with ``augment``, its
    augmentation record (without tar/npy headers)."""
    return views_dtype(num_classes, topk, full_softmax, augment=augment).itemsize

"""The shard schema, defined once: member names, dtypes and the schema version.

A shard is a plain WebDataset tar. Each sample ``KEY`` (no dots; ``s`` + 9 digits of its index in
the sorted input list; shards mix inputs in a seeded order) has these members:

===================  =====================  =================================================
member               content                shape / dtype
===================  =====================  =================================================
``KEY.<ext>``        original image bytes   ext is the real type: jpg, png, webp, gif, bmp, tiff
``KEY.cls``          true label             ASCII decimal int
``KEY.json``         source metadata        {"path", "height", "width"} (after EXIF transpose)
``KEY.box.npy``      view crop boxes        (V + 1, 4) int32: top, left, height, width
``KEY.flip.npy``     view horizontal flips  (V + 1,) uint8
``KEY.hard.npy``     teacher argmax         (V + 1,) uint16 (int32 above 65,536 classes)
``KEY.topk.npy``     top-k class indices    (V + 1, K) same dtype as hard, by falling prob
``KEY.prob.npy``     top-k probabilities    (V + 1, K) float16
``KEY.rest.npy``     leftover mass          (V + 1,) float16: 1 - sum of the stored top-k
``KEY.softmax.npy``  full softmax           (V + 1, C) float16, only with --full-softmax
===================  =====================  =================================================

Row 0 of every per-view array is the global view (the teacher's eval transform: resize and
centre crop, expressed as a box in source pixels); rows 1..V are the random views. Boxes are in
source-image pixels after EXIF transpose and RGB conversion.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_PATTERN = "s{:09d}"

# Per-view members, in the order they are written.
BOX = "box.npy"
FLIP = "flip.npy"
HARD = "hard.npy"
TOPK = "topk.npy"
PROB = "prob.npy"
REST = "rest.npy"
SOFTMAX = "softmax.npy"
CLS = "cls"
META = "json"

VIEW_MEMBERS = (BOX, FLIP, HARD, TOPK, PROB, REST)

# Image types stored under their real extension, detected from content.
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "gif", "bmp", "tiff")

BOX_DTYPE = np.int32
FLIP_DTYPE = np.uint8
PROB_DTYPE = np.float16


def class_dtype(num_classes: int) -> type:
    """Dtype of class indices (``hard``, ``topk``): uint16 up to 65,536 classes, else int32."""
    return np.uint16 if num_classes <= 65536 else np.int32


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(index: int) -> str:
    return KEY_PATTERN.format(index)


def bytes_per_view(num_classes: int, topk: int, full_softmax: bool) -> int:
    """Payload bytes of one view's geometry and teacher outputs (without tar/npy headers)."""
    c = np.dtype(class_dtype(num_classes)).itemsize
    p = np.dtype(PROB_DTYPE).itemsize
    n = 4 * np.dtype(BOX_DTYPE).itemsize + np.dtype(FLIP_DTYPE).itemsize + c + topk * (c + p) + p
    return int(n + (num_classes * p if full_softmax else 0))

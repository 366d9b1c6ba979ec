"""Writing shards: encode one sample to members, and write a tar that appears only when complete.

Samples are written in schema version 2 (``schema.SCHEMA_VERSION``: the per-view arrays as one
``views.npy`` member) unless ``encode_sample(..., schema_version=1)`` asks for version 1.

Tars are byte-for-byte reproducible: members in schema order, mtime 0, uid/gid 0, no user or
group names, mode 0444, and ``.npy``/JSON encodings that depend only on the values. Rerunning a
stage with the same inputs and teacher therefore writes identical shards (and sha256s).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deitpipe.shards.format import schema
from deitpipe.shards.storage.atomic import commit_file, discard_file, temp_path

_FLOAT_FIELDS = ("prob", "rest", schema.SOFTMAX_FIELD)
_CLASS_FIELDS = ("hard", "topk")
_ALL_FIELDS = schema.VIEW_FIELDS + schema.AUG_FIELD_NAMES + (schema.SOFTMAX_FIELD,)
_NDIM = {"box": 2, "flip": 1, "hard": 1, "topk": 2, "prob": 2, "rest": 1, schema.SOFTMAX_FIELD: 2,
         **{name: 1 + len(shape) for name, _, shape in schema.AUG_FIELDS}}
_AUG_DTYPES = {name: np.dtype(kind) for name, kind, _ in schema.AUG_FIELDS}
_AUG_SHAPES = {name: shape for name, _, shape in schema.AUG_FIELDS}  # per view


def npy_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes (no pickle, C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _cast_field(field: str, arr: Any, num_classes: int | None) -> np.ndarray:
    arr = np.asarray(arr)
    if field == "box":
        return arr.astype(schema.BOX_DTYPE)
    if field == "flip":
        return arr.astype(schema.FLIP_DTYPE)
    if field in _AUG_DTYPES:
        return arr.astype(_AUG_DTYPES[field])
    if field in _FLOAT_FIELDS:
        return arr.astype(schema.PROB_DTYPE)
    if field in _CLASS_FIELDS:
        if num_classes is not None:
            return arr.astype(schema.class_dtype(num_classes))
        if arr.dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
            raise ValueError(f"{field} must be uint16 or int32 (schema.class_dtype), got {arr.dtype}")
        return arr
    raise ValueError(f"unknown view field {field!r}; expected one of {_ALL_FIELDS}")


def _check_shapes(key: str, arrays: dict[str, np.ndarray]) -> None:
    """One line naming the sample when the per-view arrays do not fit one row layout."""
    rows = {f: a.shape[0] if a.ndim else -1 for f, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"sample {key}: per-view arrays disagree on the number of views: {rows}")
    shapes = {f: a.shape for f, a in arrays.items()}
    if (any(a.ndim != _NDIM[f] for f, a in arrays.items()) or shapes["box"][1] != 4
            or shapes["topk"] != shapes["prob"]):
        raise ValueError(f"sample {key}: per-view arrays have the wrong shapes {shapes}; expected box (V+1, 4), "
                         "flip, hard and rest (V+1,), topk and prob (V+1, K), softmax (V+1, C)")
    # A record column of the wrong width would be broadcast into the row without a word.
    wrong = {f: a.shape for f, a in arrays.items() if f in _AUG_SHAPES and a.shape[1:] != _AUG_SHAPES[f]}
    if wrong:
        expected = {f: ("V+1", *_AUG_SHAPES[f]) for f in wrong}
        raise ValueError(f"sample {key}: augmentation record fields have shapes {wrong}, expected {expected}")
    if arrays["topk"].dtype != arrays["hard"].dtype:
        raise ValueError(f"sample {key}: topk is {arrays['topk'].dtype} but hard is {arrays['hard'].dtype}")


def _views_array(arrays: dict[str, np.ndarray], num_classes: int | None) -> np.ndarray:
    """The version 2 ``views.npy`` array: one structured row per view."""
    softmax = arrays.get(schema.SOFTMAX_FIELD)
    width = softmax.shape[1] if softmax is not None else (num_classes or 0)
    dtype = schema.views_dtype(width, arrays["topk"].shape[1], softmax is not None,
                               index_dtype=arrays["hard"].dtype, augment="ra_op" in arrays)
    rows = np.zeros(arrays["box"].shape[0], dtype=dtype)
    for field, arr in arrays.items():
        rows[field] = arr
    return rows


def encode_sample(
    *,
    key: str,
    image_bytes: bytes,
    image_ext: str,
    label: int,
    meta: Mapping[str, Any],
    views: Mapping[str, np.ndarray],
    num_classes: int | None = None,
    schema_version: int | None = None,
) -> dict[str, Any]:
    """Build the member dict of one sample as the schema defines it.

    Args:
        key: Sample key (``schema.sample_key(index)``), no dots.
        image_bytes: Original image bytes.
        image_ext: Real image type, one of ``schema.IMAGE_EXTENSIONS``.
        label: True class index; ``schema.UNLABELED`` (or any negative) writes no ``cls`` member.
        meta: Source metadata with at least ``path``, ``height``, ``width``.
        views: Per-view arrays keyed by field name with or without ``.npy`` (``box``, ``flip``,
            ``hard``, ``topk``, ``prob``, ``rest``, optional ``softmax``); all V + 1 rows.
        num_classes: When given, ``hard``/``topk`` are cast to ``schema.class_dtype`` and a
            ``softmax`` must have this many columns.
        schema_version: 2 packs the per-view arrays into one ``views.npy`` member; 3 does so
            with the augmentation record (``schema.AUG_FIELDS``, all of them, in ``views``); 1
            writes one ``<field>.npy`` member per array, as version 1 readers expect. Default:
            3 when ``views`` holds the record, else 2.

    Returns:
        ``{"__key__": key, "<ext>": bytes, "cls": bytes, "json": bytes, "views.npy": bytes}``
        (version 1: ``"box.npy": bytes, ...`` instead of ``"views.npy"``).
    """
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    if image_ext not in schema.IMAGE_EXTENSIONS:
        raise ValueError(f"image_ext {image_ext!r} is not one of {schema.IMAGE_EXTENSIONS}")
    if schema_version is not None and schema_version not in schema.READABLE_VERSIONS:
        raise ValueError(f"schema_version {schema_version!r} is not one of {schema.READABLE_VERSIONS}")
    missing = [k for k in ("path", "height", "width") if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: meta lacks {missing}")
    arrays = {k.removesuffix(".npy"): v for k, v in views.items()}
    arrays = {f: _cast_field(f, v, num_classes) for f, v in arrays.items()}
    absent = [f for f in schema.VIEW_FIELDS if f not in arrays]
    if absent:
        raise ValueError(f"sample {key}: views lack {absent}")
    record = [f for f in schema.AUG_FIELD_NAMES if f in arrays]
    if schema_version is None:
        schema_version = schema.AUGMENTED_VERSION if record else schema.SCHEMA_VERSION
    if record and (len(record) != len(schema.AUG_FIELD_NAMES) or schema_version != schema.AUGMENTED_VERSION):
        raise ValueError(f"sample {key}: an augmentation record needs all of {list(schema.AUG_FIELD_NAMES)} and "
                         f"schema version {schema.AUGMENTED_VERSION}, got {record} in version {schema_version}")
    if schema_version == schema.AUGMENTED_VERSION and not record:
        raise ValueError(f"sample {key}: schema version 3 needs the augmentation record {list(schema.AUG_FIELD_NAMES)}")
    _check_shapes(key, arrays)
    softmax = arrays.get(schema.SOFTMAX_FIELD)
    if softmax is not None and num_classes is not None and softmax.shape[1] != num_classes:
        raise ValueError(f"sample {key}: softmax has {softmax.shape[1]} columns, num_classes is {num_classes}")
    sample: dict[str, Any] = {
        "__key__": key,
        image_ext: bytes(image_bytes),
        schema.META: json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    if int(label) >= 0:
        sample[schema.CLS] = str(int(label)).encode("ascii")
    if schema_version >= 2:
        sample[schema.VIEWS] = npy_bytes(_views_array(arrays, num_classes))
        return sample
    for field in _ALL_FIELDS:
        if field in arrays:
            sample[f"{field}.npy"] = npy_bytes(arrays[field])
    return sample


_MEMBER_ORDER = (schema.CLS, schema.META, schema.VIEWS) + schema.V1_VIEW_MEMBERS + (schema.SOFTMAX,)


def _member_order(member: str) -> tuple[int, str]:
    if member in schema.IMAGE_EXTENSIONS:
        return 0, member
    if member in _MEMBER_ORDER:
        return 1 + _MEMBER_ORDER.index(member), member
    return len(_MEMBER_ORDER) + 1, member


class _HashingFile:
    """Write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


class ShardFileWriter:
    """Write one shard tar; it appears under its final name only when the block exits cleanly.

    Usage::

        with ShardFileWriter(out_dir, "shard-000000.tar") as w:
            w.write(encode_sample(...))
        w.count, w.sha256, w.record()

    Samples go to a temporary file (``.{name}.tmp-{pid}-{n}``) in ``out_dir``, which is fsynced,
    renamed to ``name`` and followed by an fsync of ``out_dir``. On an exception, including one of
    the final writes or the close (a full disk), that file is deleted, nothing is left under
    ``name``, and the exception propagates.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.path = self.out_dir / name
        self.tmp_path = temp_path(self.path)
        self.count = 0
        self.sha256: str | None = None
        self.nbytes = 0
        self._keys: set[str] = set()
        self._raw: io.BufferedWriter | None = None
        self._hash: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardFileWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._raw = open(self.tmp_path, "wb")
        self._hash = _HashingFile(self._raw)
        # USTAR: no PAX headers, so the bytes depend only on names, sizes and content.
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore
        return self

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample (a dict from :func:`encode_sample`: ``__key__`` plus members)."""
        if self._tar is None:
            raise RuntimeError("ShardFileWriter.write outside its with-block")
        key = sample["__key__"]
        if key in self._keys:
            raise ValueError(f"{self.name}: duplicate sample key {key}")
        self._keys.add(key)
        members = sorted((k for k in sample if not k.startswith("__")), key=_member_order)
        for member in members:
            data = sample[member]
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"{self.name}: {key}.{member} must be bytes, got {type(data).__name__}")
            info = tarfile.TarInfo(f"{key}.{member}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._raw is not None and self._hash is not None and self._tar is not None
        tar, self._tar = self._tar, None
        if exc_type is not None:
            discard_file(self._raw, self.tmp_path)
            return
        try:
            tar.close()  # end-of-archive blocks
        except BaseException:
            discard_file(self._raw, self.tmp_path)
            raise
        commit_file(self._raw, self.tmp_path, self.path)
        self.sha256 = self._hash.sha.hexdigest()
        self.nbytes = self._hash.size

    def record(self) -> dict[str, Any]:
        """The shard's manifest entry (without ``first_index``, which the planner knows)."""
        if self.sha256 is None:
            raise RuntimeError(f"{self.name} is not complete yet")
        return {"name": self.name, "samples": self.count, "sha256": self.sha256, "bytes": self.nbytes}

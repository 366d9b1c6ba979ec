"""Writing shards: encode one sample to members, and write a tar that appears only when complete.

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

from deitpipe.shards import schema
from deitpipe.shards.atomic import commit_file, discard_file, temp_path

_FLOAT_MEMBERS = (schema.PROB, schema.REST, schema.SOFTMAX)
_CLASS_MEMBERS = (schema.HARD, schema.TOPK)


def npy_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as ``.npy`` bytes (no pickle, C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _member_name(name: str) -> str:
    return name if name.endswith(".npy") else f"{name}.npy"


def _cast_view_array(member: str, arr: Any, num_classes: int | None) -> np.ndarray:
    arr = np.asarray(arr)
    if member == schema.BOX:
        return arr.astype(schema.BOX_DTYPE)
    if member == schema.FLIP:
        return arr.astype(schema.FLIP_DTYPE)
    if member in _FLOAT_MEMBERS:
        return arr.astype(schema.PROB_DTYPE)
    if member in _CLASS_MEMBERS:
        if num_classes is not None:
            return arr.astype(schema.class_dtype(num_classes))
        if arr.dtype not in (np.dtype(np.uint16), np.dtype(np.int32)):
            raise ValueError(f"{member} must be uint16 or int32 (schema.class_dtype), got {arr.dtype}")
        return arr
    known = schema.VIEW_MEMBERS + (schema.SOFTMAX,)
    raise ValueError(f"unknown view member {member!r}; expected one of {known}")


def encode_sample(
    *,
    key: str,
    image_bytes: bytes,
    image_ext: str,
    label: int,
    meta: Mapping[str, Any],
    views: Mapping[str, np.ndarray],
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Build the member dict of one sample as the schema defines it.

    Args:
        key: Sample key (``schema.sample_key(index)``), no dots.
        image_bytes: Original image bytes.
        image_ext: Real image type, one of ``schema.IMAGE_EXTENSIONS``.
        label: True class index.
        meta: Source metadata with at least ``path``, ``height``, ``width``.
        views: Per-view arrays keyed by member name with or without ``.npy`` (``box``, ``flip``,
            ``hard``, ``topk``, ``prob``, ``rest``, optional ``softmax``); all V + 1 rows.
        num_classes: When given, ``hard``/``topk`` are cast to ``schema.class_dtype``.

    Returns:
        ``{"__key__": key, "<ext>": bytes, "cls": bytes, "json": bytes, "box.npy": bytes, ...}``.
    """
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    if image_ext not in schema.IMAGE_EXTENSIONS:
        raise ValueError(f"image_ext {image_ext!r} is not one of {schema.IMAGE_EXTENSIONS}")
    missing = [k for k in ("path", "height", "width") if k not in meta]
    if missing:
        raise ValueError(f"sample {key}: meta lacks {missing}")
    arrays = {_member_name(k): _cast_view_array(_member_name(k), v, num_classes) for k, v in views.items()}
    absent = [m for m in schema.VIEW_MEMBERS if m not in arrays]
    if absent:
        raise ValueError(f"sample {key}: views lack {absent}")
    rows = {m: a.shape[0] if a.ndim else -1 for m, a in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"sample {key}: per-view arrays disagree on the number of views: {rows}")
    sample: dict[str, Any] = {
        "__key__": key,
        image_ext: bytes(image_bytes),
        schema.CLS: str(int(label)).encode("ascii"),
        schema.META: json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
    for member in schema.VIEW_MEMBERS + (schema.SOFTMAX,):
        if member in arrays:
            sample[member] = npy_bytes(arrays[member])
    return sample


def _member_order(member: str) -> tuple[int, str]:
    fixed = (schema.CLS, schema.META) + schema.VIEW_MEMBERS + (schema.SOFTMAX,)
    if member in schema.IMAGE_EXTENSIONS:
        return 0, member
    if member in fixed:
        return 1 + fixed.index(member), member
    return len(fixed) + 1, member


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

"""Reading shards as a chain of small generator stages.

``expand_urls(spec)`` -> ``iter_tar_samples(urls)`` (raw member bytes) -> ``decode_sample`` (numpy
arrays, label, metadata; the image stays as its original bytes) -> ``teacher_distribution``.
Samples of schema versions 1 and 2 decode to the same dict, so a shard set may mix them.
Nothing here unpickles: ``.npy`` members with object dtypes are refused (``load_npy``).
"""

from __future__ import annotations

import io
import json
import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from webdataset import shardlists, tariterators

from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import read_manifest
from deitpipe.shards.format.tarsamples import split_ustar
from deitpipe.shards.specs import is_remote  # re-exported: one definition, importable without webdataset

_V1_MEMBERS = schema.V1_VIEW_MEMBERS + (schema.SOFTMAX,)


def shard_name(url: str) -> str:
    """The shard's file name in a path, URL or ``pipe:`` command (``pipe:aws s3 cp s3://b/x.tar -``
    names ``x.tar``): the key the manifest lists it under, and the same for every way to read it."""
    names = re.findall(r"([^/\s']+\.tar)'?(?:\s|$)", url)
    return names[-1] if names else os.path.basename(url)


def expand_urls(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Expand a shard specification to a list of URLs.

    Args:
        spec: A shard directory (its ``manifest.json`` order, else its sorted ``*.tar``), a brace
            pattern like ``out/shard-{000000..000009}.tar``, several patterns joined by ``::``, a
            single path/URL (``pipe:``, ``s3://``, ``http(s)://``), or a list of those.

    Returns:
        URLs in reading order.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return [url for item in spec for url in expand_urls(item)]
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        manifest = Path(spec) / schema.MANIFEST_NAME
        if manifest.exists():
            return [str(Path(spec) / s["name"]) for s in read_manifest(manifest)["shards"]]
        return [str(p) for p in sorted(Path(spec).glob("*.tar"))]
    if is_object_dir(spec):
        manifest = storage.join(spec, schema.MANIFEST_NAME)
        if storage.is_file(manifest):
            return [storage.join(spec, s["name"]) for s in read_manifest(manifest)["shards"]]
        return [storage.join(spec, n) for n in storage.list_names(spec) if n.endswith(".tar")]
    return list(shardlists.expand_urls(spec))  # "::" lists and {a..b} braces


def is_object_dir(spec: str) -> bool:
    """Whether ``spec`` names a prefix in object storage (``s3://bucket/shards/``) rather than tars."""
    return storage.is_object_uri(spec) and "{" not in spec and "::" not in spec and not spec.endswith(".tar")


def iter_tar_samples(urls: str | Iterable[str]) -> Iterator[dict[str, Any]]:
    """Yield raw samples, in stored order, from one or more tar URLs.

    Args:
        urls: A URL or spec accepted by :func:`expand_urls`, or a list of them.

    Returns:
        Iterator of dicts ``{"__key__", "__url__", member: bytes, ...}``.
    """
    expanded = expand_urls(urls)
    for url in expanded:
        local = url.removeprefix("file:")
        if not is_remote(url) and not os.path.isfile(local):
            raise ValueError(f"tar {url} does not exist; check the path or brace pattern")
    yield from tariterators.group_by_keys(tariterators.tar_file_expander(_opened(expanded)))


def _opened(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Each URL's stream, opened when its turn comes and closed once its members are read."""
    for url in urls:
        with storage.open_url(url) as stream:
            yield {"url": url, "stream": stream}


class ShardChangedError(ValueError):
    """A shard's bytes are not those its manifest lists (one-line message naming the shard)."""


def read_shard(url: str, *, sha256: str | None = None) -> list[dict[str, Any]]:
    """All raw samples of one shard, as :func:`iter_tar_samples` yields them, from one read.

    deitpipe's shards are plain ustar archives of regular members; those are split by
    ``tarsamples.split_ustar`` without ``tarfile``'s per-member cost, which exceeds the cost of the
    small members themselves. Any other archive (long names, pax headers, a bad checksum) goes
    through webdataset.

    Args:
        url: One shard path or URL (``pipe:``, ``s3://``, ``http(s)://``).
        sha256: the manifest's hex digest of the shard; the bytes read are checked against it
            (the hash runs over bytes already in memory) before any sample is used.
    Raises:
        ShardChangedError: the bytes differ from ``sha256``.
    """
    src = url
    local = url.removeprefix("file:")
    if is_remote(url):
        with storage.open_url(url) as f:
            data = f.read()
    else:
        if not os.path.isfile(local):
            raise ValueError(f"tar {url} does not exist; check the path or brace pattern")
        with open(local, "rb") as f:
            data = f.read()
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ShardChangedError(
                f"{url}: sha256 {digest[:12]}... differs from its manifest's {sha256[:12]}...: the shard changed "
                "after it was labelled; relabel it (label-teacher with the same arguments) or restore it")
    samples = split_ustar(data, src)
    if samples is None:
        members = tariterators.tar_file_expander([{"url": src, "stream": io.BytesIO(data)}])
        samples = list(tariterators.group_by_keys(members))
    return samples


def load_npy(data: bytes) -> np.ndarray:
    """Load ``.npy`` bytes without allowing pickled objects.

    The header is parsed by numpy's own header reader (which evaluates no code), and the size it
    declares is checked against the bytes present before anything is allocated, so a damaged or
    hostile member cannot ask for terabytes. Every sample of a shard set has the same few headers:
    each is parsed once and remembered, and the array is viewed directly from the bytes.

    Raises:
        ValueError: one line: not ``.npy``, an object (pickled) dtype, or fewer bytes than declared.
    """
    return _npy_view(data).copy()


def _npy_view(data: bytes) -> np.ndarray:
    """:func:`load_npy` without the copy: a read-only array over ``data``."""
    header = _npy_header(data)
    if header is None:
        raise ValueError("npy member is not .npy data (no NUMPY magic)")
    layout = _NPY_HEADERS.get(header)
    if layout is None:
        layout = _parse_npy_header(data)
        if len(_NPY_HEADERS) < 1024:
            _NPY_HEADERS[header] = layout
    dtype, shape, order = layout
    count = math.prod(shape)  # Python ints: no overflow for absurd shapes
    declared, held = count * dtype.itemsize, len(data) - len(header)
    if declared > held:
        raise ValueError(f"npy member declares {declared} bytes but holds {held}")
    if dtype.itemsize == 0:
        return np.empty(shape, dtype=dtype, order=order)
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape, order=order)


def _parse_npy_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], str]:
    """``(dtype, shape, order)`` from a ``.npy`` header, refusing object dtypes."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
        # Version 3 differs from 2 only in allowing utf-8 in the header text.
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except (ValueError, EOFError) as exc:
        raise ValueError(f"npy member has an unreadable header: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if dtype.hasobject:
        raise ValueError("npy member holds Python objects, which cannot be loaded with allow_pickle=False")
    return dtype, tuple(shape), "F" if fortran else "C"


def _npy_header(data: bytes) -> bytes | None:
    """The magic, version and header dict of ``.npy`` bytes (everything before the array data)."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        return None
    size_bytes = 2 if data[6] == 1 else 4
    return data[:8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")]


# Parsing views.npy's structured header (numpy evaluates the header text) costs two to four times
# what splitting and decoding the whole sample costs otherwise (BENCHMARKS.md, "Loader cost"); a
# shard set has one such header per (V, K, C), so this holds a handful of entries.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], str]] = {}


def image_member(sample: dict[str, Any]) -> str | None:
    """The member holding the image bytes (its extension is the real type), or None."""
    for ext in schema.IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None


def sample_schema_version(raw: dict[str, Any]) -> int:
    """The schema version a raw sample was written in: 3 with a ``views.npy`` that holds the
    augmentation record, 2 with one that does not, else 1."""
    if schema.VIEWS not in raw:
        return 1
    try:
        names = _parse_npy_header(raw[schema.VIEWS])[0].names or ()
    except ValueError:
        return 2
    return schema.AUGMENTED_VERSION if "ra_op" in names else 2


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode the members of one raw sample, of schema version 1 or 2.

    Args:
        raw: A dict from :func:`iter_tar_samples`.

    Returns:
        ``{"key", "url", "image" (original bytes), "image_ext", "label" (int; ``schema.UNLABELED``
        without a cls member), "meta" (dict), "box", "flip", "hard", "topk", "prob", "rest"[, "softmax"]}`` with numpy arrays for the
        per-view fields (row 0 is the global view), the same for both versions.
    """
    key = raw["__key__"]
    ext = image_member(raw)
    v1 = [m for m in _V1_MEMBERS if m in raw]
    if schema.VIEWS in raw and v1:
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} holds both {schema.VIEWS} (version 2) and "
                         f"{v1} (version 1); rewrite it with one version")
    views = (schema.VIEWS,) if schema.VIEWS in raw or not v1 else schema.V1_VIEW_MEMBERS
    missing = [m for m in (schema.META,) + views if m not in raw]  # no cls: no true label
    if ext is None or missing:
        lacks = missing + ([] if ext is not None else ["<image>"])
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key} lacks members {lacks}")
    where = f"{raw.get('__url__', '?')}: sample {key}"
    try:
        label = int(raw[schema.CLS].decode("ascii").strip()) if schema.CLS in raw else schema.UNLABELED
        meta = json.loads(raw[schema.META])
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: unreadable {schema.CLS} or {schema.META} ({str(exc).splitlines()[0]})") from None
    out: dict[str, Any] = {"key": key, "url": raw.get("__url__"), "image": raw[ext], "image_ext": ext,
                           "label": label, "meta": meta}
    if schema.VIEWS in raw:
        out.update(_split_views(raw[schema.VIEWS], where))
    else:
        for member in v1:
            try:
                out[member.removesuffix(".npy")] = load_npy(raw[member])
            except ValueError as exc:
                raise ValueError(f"{where}: {member}: {exc}") from None
    return out


_FIELDS = schema.VIEW_FIELDS + schema.AUG_FIELD_NAMES + (schema.SOFTMAX_FIELD,)


def _split_views(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The fields of a version 2 or 3 ``views.npy`` as separate C-ordered arrays in native byte
    order; a version 3 record comes whole (all of ``schema.AUG_FIELD_NAMES``) or not at all."""
    try:
        rows = _npy_view(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {schema.VIEWS}: {exc}") from None
    names = rows.dtype.names or ()
    record = set(names) & set(schema.AUG_FIELD_NAMES)
    if (rows.ndim != 1 or not set(schema.VIEW_FIELDS) <= set(names) or not set(names) <= set(_FIELDS)
            or record and record != set(schema.AUG_FIELD_NAMES)):
        raise ValueError(f"{where}: {schema.VIEWS} must be a 1-D structured array with fields "
                         f"{list(schema.VIEW_FIELDS)} [+ the augmentation record] [+ softmax], got shape {rows.shape} fields {list(names)}")
    out = {}
    for name in _FIELDS:
        if name in names:
            col = rows[name]
            out[name] = col.astype(col.dtype.newbyteorder("="), order="C")
    return out


def iter_samples(urls: str | Iterable[str]) -> Iterator[dict[str, Any]]:
    """:func:`iter_tar_samples` followed by :func:`decode_sample`."""
    for raw in iter_tar_samples(urls):
        yield decode_sample(raw)


def teacher_distribution(sample: dict[str, Any], view: int, num_classes: int) -> np.ndarray:
    """The teacher's class distribution for one stored view.

    With a stored full softmax, that row (renormalised after float16 storage). Otherwise the
    top-k probabilities at their class indices and the leftover mass spread uniformly over the
    other ``C - K`` classes.

    Args:
        sample: A dict from :func:`decode_sample`.
        view: Row index, 0 = global view, 1..V = random views.
        num_classes: Number of classes C.

    Returns:
        (C,) float32 probabilities summing to 1.
    """
    if "softmax" in sample:
        row = sample["softmax"][view].astype(np.float64)
        if row.shape != (num_classes,):
            raise ValueError(
                f"sample {sample['key']}: softmax row has {row.shape[0]} classes, expected {num_classes}"
            )
        return (row / row.sum()).astype(np.float32)
    idx = sample["topk"][view].astype(np.int64)
    prob = np.clip(sample["prob"][view].astype(np.float64), 0.0, None)
    if idx.size and idx.max() >= num_classes:
        raise ValueError(f"sample {sample['key']}: top-k class {idx.max()} >= num_classes {num_classes}")
    dist = np.zeros(num_classes, dtype=np.float64)
    dist[idx] = prob
    others = num_classes - len(np.unique(idx))
    rest = max(float(sample["rest"][view]), 0.0) if "rest" in sample else max(1.0 - prob.sum(), 0.0)
    if others > 0:
        mask = np.ones(num_classes, dtype=bool)
        mask[idx] = False
        dist[mask] = rest / others
    total = dist.sum()
    if total <= 0:
        return np.full(num_classes, 1.0 / num_classes, dtype=np.float32)
    return (dist / total).astype(np.float32)

"""The shard set's manifest (``manifest.json``): what it holds, writing it, reading and checking it.

Keys the pipeline writes (all JSON):

- ``schema_version`` (int, ``schema.SCHEMA_VERSION`` when written; ``schema.READABLE_VERSIONS``
  are read: each sample's members say its own version, so a set resumed by a newer writer may
  mix them), ``created`` (ISO time), ``config``
  (``asdict`` of the run config), ``seed``, ``complete`` (false while shards are being written)
- ``teacher``: ``{name, weights, weights_sha256, preprocessing}``
- ``num_classes``, ``class_names``, ``views`` (V random views per sample), ``topk``,
  ``full_softmax``
- ``shards``: ``[{name, samples, sha256, bytes, first_index, candidates, skipped}, ...]`` in
  reading order; ``candidates`` inputs from position ``first_index`` of the assignment order
  (``plan.assign_shards``), ``samples`` of them stored
- ``inputs``: ``{found, labelled, skipped: [{path, reason}], ignored, ignored_examples}``

:func:`read_manifest` checks the types of these keys (``shards`` entries need ``name`` and
``samples``; other keys may be absent) so that a damaged manifest fails there, in one line.
Checking a shard directory against its manifest is ``verify.verify_shards``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.specs import is_remote
from deitpipe.shards.storage.atomic import atomic_writer


class ManifestError(ValueError):
    """A manifest is missing, unreadable or of another schema version (one-line message)."""


def _manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / schema.MANIFEST_NAME if p.is_dir() else p


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` atomically and durably (``atomic.atomic_writer``: temporary file,
    fsync, rename, fsync of the directory); on an error nothing is left but the old file."""
    text = json.dumps(data, indent=2) + "\n"  # serialise first: a TypeError leaves no file at all
    if storage.is_object_uri(path):
        storage.write_bytes(path, text.encode("utf-8"))
        return
    with atomic_writer(path, text=True) as f:
        f.write(text)


def write_manifest(out_dir: str | os.PathLike, data: dict[str, Any]) -> Path | str:
    """Write ``out_dir/manifest.json`` atomically.

    Args:
        out_dir: Shard directory, or ``s3://`` prefix.
        data: Manifest content; ``schema_version`` is set to ``schema.SCHEMA_VERSION`` if absent,
            and must be one of ``schema.READABLE_VERSIONS`` (1 for a set written in version 1).

    Returns:
        The manifest path.
    """
    data = {"schema_version": schema.SCHEMA_VERSION, **data}
    version = data["schema_version"]
    if type(version) is not int or version not in schema.READABLE_VERSIONS:
        raise ValueError(f"manifest schema_version {version!r} is not one of {schema.READABLE_VERSIONS}")
    if not storage.is_object_uri(out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = storage.join(out_dir, schema.MANIFEST_NAME)
    write_json_atomic(path, data)
    return path if storage.is_object_uri(path) else Path(path)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a manifest.

    Args:
        path: Shard directory or the manifest file itself, or the manifest's URL (``s3://``,
            ``http(s)://``, ``pipe:CMD``), read as shards are read.

    Returns:
        The manifest dict.

    Raises:
        ManifestError: One line naming the file: missing, not JSON, or another schema version.
    """
    return read_manifest_digest(path)[0]


def read_manifest_digest(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """:func:`read_manifest`, and the hex sha256 of the manifest's bytes: the identity of the
    label set a student run trains on."""
    text, where = _manifest_bytes(path)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: manifest is not valid JSON ({exc}); relabel or restore it") from None
    return _parse_manifest(decoded, where), hashlib.sha256(text).hexdigest()


def _manifest_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    if is_remote(path):
        where = str(path)
        if storage.is_object_uri(where) and not where.endswith(".json"):
            where = storage.join(where, schema.MANIFEST_NAME)  # a shard prefix, like a shard directory
        try:
            with storage.open_url(where) as f:
                return f.read(), where
        except (OSError, ValueError) as exc:
            cause = exc.cause if isinstance(exc, storage.StorageError) else exc
            raise ManifestError(f"{where}: cannot read the manifest ({cause}); check the URL or pass --manifest") from None
    p = _manifest_path(path)
    try:
        return p.read_bytes(), str(p)
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest; is this a shard directory written by deitpipe?") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot read the manifest ({exc.strerror or exc})") from None


def _parse_manifest(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where}: manifest is not valid JSON ({exc}); relabel or restore it") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: manifest must be a JSON object, got {type(data).__name__}; relabel or restore it")
    if "shards" not in data:
        raise ManifestError(f"{where}: manifest has no 'shards' list; relabel or restore it")
    version = data.get("schema_version")
    if type(version) is not int or version not in schema.READABLE_VERSIONS:  # not True, not 2.0
        readable = ", ".join(map(str, schema.READABLE_VERSIONS[:-1])) + f" and {schema.READABLE_VERSIONS[-1]}"
        raise ManifestError(
            f"{where}: shard schema_version {version!r}, this deitpipe reads {readable}; relabel with this version"
        )
    _check_fields(data, where)
    return data


def _is_int(low: int | None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is(kind: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, kind)


def _is_file_name(v: Any) -> bool:
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# key -> (check, what it must be); keys absent from a manifest are not checked, except _REQUIRED_SHARD.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": (_is_int(1), "an integer >= 1"),
    "views": (_is_int(0), "an integer >= 0"),
    "topk": (_is_int(1), "an integer >= 1"),
    "seed": (_is_int(None), "an integer"),
    "class_names": (_is_str_list, "a list of strings"),
    "complete": (_is(bool), "true or false"),
    "full_softmax": (_is(bool), "true or false"),
    "created": (_is(str), "a string"),
    "teacher": (_is(dict), "an object"),
    "config": (_is(dict), "an object"),
    "inputs": (_is(dict), "an object"),
}
_SHARD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_file_name, "a file name (a non-empty string without '/')"),
    "samples": (_is_int(0), "an integer >= 0"),
    "bytes": (_is_int(0), "an integer >= 0"),
    "sha256": (_is(str), "a string"),
    "first_index": (_is_int(0), "an integer >= 0"),
    "candidates": (_is_int(0), "an integer >= 0"),
    "skipped": (_is(list), "a list"),
}
_REQUIRED_SHARD = ("name", "samples")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(data: dict[str, Any], where: str) -> None:
    """Raise a one-line :class:`ManifestError` naming the first key of the wrong type.

    An in-progress manifest (``complete`` false, few or no shards) is valid; so is one that omits
    optional keys. Required: ``shards``, a list of objects each with ``name`` and ``samples``.
    """
    def fail(key: str, what: str, value: Any) -> ManifestError:
        return ManifestError(f"{where}: {key!r} must be {what}, got {_show(value)}")

    for key, (ok, what) in _FIELDS.items():
        if key in data and not ok(data[key]):
            raise fail(key, what, data[key])
    if not isinstance(data["shards"], list):
        raise fail("shards", "a list of shard entries", data["shards"])
    for i, entry in enumerate(data["shards"]):
        if not isinstance(entry, dict):
            raise fail(f"shards[{i}]", "an object", entry)
        for key in _REQUIRED_SHARD:
            if key not in entry:
                raise ManifestError(f"{where}: 'shards[{i}].{key}' is missing")
        for key, (ok, what) in _SHARD_FIELDS.items():
            if key in entry and not ok(entry[key]):
                raise fail(f"shards[{i}].{key}", what, entry[key])

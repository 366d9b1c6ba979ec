"""The shard set's manifest (``manifest.json``) and verification of a shard directory.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deitpipe.shards import schema, storage
from deitpipe.shards.atomic import atomic_writer
from deitpipe.shards.reader import decode_sample, is_remote, iter_tar_samples, open_stream


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
            with open_stream(where) as f:
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
        readable = " and ".join(map(str, schema.READABLE_VERSIONS))
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


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with storage.open_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def count_tar_samples(path: str | os.PathLike) -> int:
    """Number of samples (runs of members sharing a key) in a shard, without decoding."""
    count, last = 0, None
    with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            key = info.name.split("/")[-1].split(".", 1)[0]
            if info.isreg() and key != last:
                count, last = count + 1, key
    return count


def find_stray_files(out_dir: str | os.PathLike, listed: set[str] | None = None) -> list[str]:
    """Warnings about leftover temporary files and tars the manifest does not list.

    Args:
        out_dir: Shard directory.
        listed: Shard names in the manifest (None: read it).

    Returns:
        One line per stray file; these are warnings, not errors.
    """
    if listed is None:
        listed = {s["name"] for s in read_manifest(out_dir)["shards"]}
    out = []
    for name in storage.list_names(out_dir):
        p = storage.join(out_dir, name)
        if ".tmp-" in name:
            out.append(f"{p}: leftover temporary file from an interrupted write; safe to delete")
        elif name.endswith(".tar") and name not in listed:
            out.append(f"{p}: tar not listed in {schema.MANIFEST_NAME}; readers of the manifest ignore it")
    return out


def _check_shard(path: str, entry: dict[str, Any], *, deep: bool, views: int | None) -> list[str]:
    if not storage.is_file(path):
        return [f"{path}: listed in {schema.MANIFEST_NAME} but missing"]
    problems = []
    sha = file_sha256(path)
    if entry.get("sha256") and sha != entry["sha256"]:
        problems.append(f"{path}: sha256 {sha[:12]}... != manifest {str(entry['sha256'])[:12]}...")
    try:
        count = count_tar_samples(path)
        if deep:
            for raw in iter_tar_samples(path):
                sample = decode_sample(raw)
                if views is not None and sample["box"].shape != (views + 1, 4):
                    shape = sample["box"].shape
                    problems.append(f"{path}: {sample['key']} box shape {shape} != ({views + 1}, 4)")
                    break
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        return problems + [f"{path}: unreadable ({exc})"]
    if count != entry.get("samples"):
        problems.append(f"{path}: {count} samples, manifest says {entry.get('samples')}")
    return problems


def verify_shards(out_dir: str | os.PathLike, *, deep: bool = False) -> list[str]:
    """Check a shard directory against its manifest.

    Each listed shard must exist, hash to its ``sha256`` and hold ``samples`` samples;
    ``first_index`` values must be contiguous. Leftover temporary files are not errors: see
    :func:`find_stray_files`.

    Args:
        out_dir: Shard directory.
        deep: Also decode every sample and check the per-view shapes against ``views``.

    Returns:
        Problems, one line each; empty when the shard set is intact.
    """
    try:
        manifest = read_manifest(out_dir)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    names = [s.get("name") for s in manifest["shards"]]
    if len(set(names)) != len(names):
        problems.append(f"{out_dir}: {schema.MANIFEST_NAME} lists a shard twice")
    next_index = 0
    for entry in manifest["shards"]:
        path = storage.join(out_dir, str(entry.get("name")))
        problems += _check_shard(path, entry, deep=deep, views=manifest.get("views"))
        first = entry.get("first_index")
        if first is not None and first != next_index:
            problems.append(f"{path}: first_index {first}, expected {next_index} (shards must be contiguous)")
        # A shard covers "candidates" planned inputs; undecodable ones are skipped, not stored.
        next_index += int(entry.get("candidates", entry.get("samples")) or 0)
    return problems

"""WebDataset tar inputs: samples with a ``cls`` and an image member, indexed where the tar allows."""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from typing import Any

from deitpipe.shards import storage
from deitpipe.shards.format.reader import expand_urls
from deitpipe.shards.format.tarsamples import group_members, tarfile_members
from deitpipe.shards.inputs.base import UNLABELED, Candidate, Input, Source
from deitpipe.shards.specs import is_remote, is_tar_spec

# Member extensions taken as the image of a WebDataset sample, in order of preference.
TAR_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm")


def _tar_label(sample: dict[str, Any]) -> int | None:
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def list_webdataset(urls: str, *, unlabeled: bool = False) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """List samples of existing WebDataset tars that have a ``cls`` and an image member.

    An uncompressed tar on local disk or in object storage (``s3://``) is indexed, not loaded:
    each candidate records where its image lies and is read when it is labelled (a ranged read
    of an object), so tars of any size work. A local tar is indexed by its headers alone; an
    object is streamed once. A compressed tar, or one read through a ``pipe:`` or
    ``http(s)://`` stream, allows no seeking, so its candidates carry their image bytes in
    memory: fine for sets that fit in RAM; copy larger ones to disk or a bucket, uncompressed.

    A key seen before in the same tar is skipped (the first sample with it is kept), so every
    sample found is either a candidate or skipped with a reason.

    Args:
        urls: Brace pattern, path, ``pipe:`` command or ``s3://`` URL (see ``reader.expand_urls``).
        unlabeled: list samples with or without ``cls``, every one ``UNLABELED``.

    Returns:
        ``(candidates in stored order, skipped (path, reason))``; paths are ``url#key``.

    Raises:
        ValueError: One line naming the tar when one is missing, truncated or corrupt.
    """
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for url in expand_urls(urls):
        local = url.removeprefix("file:")
        if not is_remote(url) and not os.path.isfile(local):
            raise ValueError(f"tar {url} does not exist; check the path or brace pattern")
        in_bucket = storage.is_object_uri(url)
        seekable = (in_bucket or not is_remote(url)) and not _compressed(url if in_bucket else local)
        keys: set[str] = set()
        for sample in _tar_samples(url, local if seekable and not in_bucket else None, index=seekable):
            key = sample["__key__"]
            path = f"{url}#{key}"
            label = UNLABELED if unlabeled else _tar_label(sample)
            member = next((m for m in TAR_IMAGE_MEMBERS if m in sample), None)
            if key in keys:
                skipped.append((path, f"duplicate sample key {key} in {url}"))
            elif label is None or (label < 0 and not unlabeled):
                skipped.append((path, "no integer cls member"))
            elif member is None:
                skipped.append((path, f"no image member (one of {', '.join(TAR_IMAGE_MEMBERS)})"))
            elif isinstance(sample[member], tarfile.TarInfo):
                info = sample[member]
                candidates.append(Candidate(path=path, label=label, kind="tarmember", ref=url if in_bucket else local,
                                            offset=info.offset_data, length=info.size))
            else:
                candidates.append(Candidate(path=path, label=label, kind="tar", ref=path, data=sample[member]))
            keys.add(key)
    return candidates, skipped


def _compressed(path: str) -> bool:
    """Whether a file starts with a gzip, bzip2, xz or zstd signature (offsets would not be file offsets)."""
    with storage.open_input(path) as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"))


def _tar_samples(url: str, local: str | None, *, index: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of one tar (``tarsamples.group_members``: a member the current sample already has
    starts a new sample with the same key, which the caller skips as a duplicate), opened by path
    when ``local`` (an uncompressed tar on disk: headers only), else streamed; ``cls`` as bytes,
    other members as their ``TarInfo`` when ``local`` or ``index`` (an uncompressed object, read
    back by ranges), else as bytes.

    Raises:
        ValueError: the tar is truncated or corrupt, including where ``tarfile`` would quietly
            stop at a damaged header: a tar must end with its end-of-archive block.
    """
    info_class, last_header = _header_watch()
    try:
        with contextlib.ExitStack() as stack:
            if local is not None:
                tar = stack.enter_context(tarfile.open(local, "r:", tarinfo=info_class))  # seeks over data
            else:
                stream = stack.enter_context(storage.open_url(url))
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*", tarinfo=info_class))
            members = tarfile_members(tar, info=local is not None or index, read=("cls",))
            yield from group_members(members, url)
            if not isinstance(last_header[0], tarfile.EOFHeaderError):
                why = last_header[0] or "end of data"
                raise tarfile.ReadError(f"{why} at byte {tar.offset} where its end-of-archive block should be")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{url}: not a readable tar (truncated or corrupt): {exc}") from None


def _header_watch() -> tuple[type[tarfile.TarInfo], list[tarfile.HeaderError | None]]:
    """A ``TarInfo`` class for ``tarfile.open(tarinfo=...)`` and the list where it records why
    reading headers stopped: an ``EOFHeaderError`` (a zero block) is the only clean end."""
    last: list[tarfile.HeaderError | None] = [None]

    class _Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                info = super().fromtarfile(tar)
            except tarfile.HeaderError as exc:
                last[0] = exc
                raise
            last[0] = None
            return info

    return _Info, last


def resolve(spec: str, *, image_size: int = 32, seed: int = 0, unlabeled: bool = False) -> Source:
    """The tars ``spec`` as a :class:`Source`, with classes ``0..max(cls)`` (``image_size`` and
    ``seed`` are unused: members are read as they are); with ``unlabeled``, no labels."""
    cands, skipped = list_webdataset(spec, unlabeled=unlabeled)
    num_classes = max((c.label for c in cands), default=-1) + 1
    names = [str(i) for i in range(num_classes)]
    return Source(spec=spec, candidates=cands, class_names=names, skipped=skipped)


def read(candidate: Candidate) -> bytes:
    """The image member's bytes: a ranged read of the tar (local or object), or the bytes carried."""
    if candidate.kind == "tarmember" and storage.is_object_uri(candidate.ref):
        return storage.read_range(candidate.ref, candidate.offset, candidate.length)
    if candidate.kind == "tarmember":
        with open(candidate.ref, "rb") as f:
            f.seek(candidate.offset)
            data = f.read(candidate.length)
        if len(data) != candidate.length:
            raise OSError(f"truncated: {candidate.ref} ends before its member {candidate.path}")
        return data
    if candidate.kind == "tar" and candidate.data is not None:
        return candidate.data
    raise ValueError(f"candidate {candidate.path}: cannot read bytes of kind {candidate.kind!r}")


INPUT = Input(name="tars", accepts=is_tar_spec, resolve=resolve, kinds=("tarmember", "tar"), read=read)

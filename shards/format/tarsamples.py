"""Tar archives as webdataset samples: one grouping of members into samples, two ways to read them.

A sample is a run of members sharing a key, as webdataset groups them (``base_plus_ext``: the
name up to the first dot of its last part is the key, the rest the extension, lower-cased).
:func:`group_members` makes samples from ``(key, ext, value)`` triples, whichever way they were
read:

- :func:`ustar_members` splits a plain ustar archive held in memory (one of deitpipe's shards,
  for ``reader.read_shard``) without ``tarfile``'s per-member cost, which exceeds the cost of the
  small members themselves; :func:`split_ustar` is that path whole, or None for another archive.
- :func:`tarfile_members` reads any archive through ``tarfile`` (input tars: other writers'
  formats, compressed, streamed), and can report a member's ``TarInfo``, which says where its
  data lies, instead of reading it.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Container, Iterable, Iterator
from typing import Any

from webdataset.tariterators import base_plus_ext

# Names webdataset skips (``__key__``-style meta members, at the top or in a folder).
META_NAME = re.compile(r"__[^/]*__($|/)")
_ZERO_BLOCK = bytes(512)


def group_members(members: Iterable[tuple[str, str, Any]], url: str | None) -> Iterator[dict[str, Any]]:
    """Samples from members in stored order.

    A new sample starts where the key changes, or where the current sample already holds the
    member's extension: the same key again, a repeat the caller decides about (webdataset
    raises; the input-tar listing skips the second sample as a duplicate).

    Args:
        members: ``(key, ext, value)`` per member, in the archive's order.
        url: The archive's URL, stored as ``__url__`` in every sample.

    Returns:
        Iterator of dicts ``{"__key__", "__url__", ext: value, ...}``.
    """
    sample: dict[str, Any] = {}
    current = None  # the key of ``sample``; no member's key is None
    for key, ext, value in members:
        if key != current or ext in sample:
            if sample:
                yield sample
            sample, current = {"__key__": key, "__url__": url}, key
        sample[ext] = value
    if sample:
        yield sample


class _NotPlainUstar(Exception):
    """The archive holds something :func:`ustar_members` leaves to webdataset."""


def split_ustar(data: bytes, url: str) -> list[dict[str, Any]] | None:
    """Samples of a plain ustar archive grouped as webdataset groups them, or None for any other
    (long names, pax headers, a bad checksum, meta names, a repeated member: webdataset's path).

    Raises:
        ValueError: The archive is cut short (one line naming ``url``).
    """
    try:
        samples = list(group_members(ustar_members(data, url), url))
    except _NotPlainUstar:
        return None
    if any(a["__key__"] == b["__key__"] for a, b in zip(samples, samples[1:])):
        return None  # a member repeated within a sample: webdataset raises
    return samples


def ustar_members(data: bytes, url: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, ext, member bytes)`` of a plain ustar archive of regular members.

    Raises:
        _NotPlainUstar: Any other header (the caller falls back to webdataset).
        ValueError: The archive is cut short (one line naming ``url``).
    """
    pos, end = 0, len(data)
    while pos + 512 <= end:
        block = data[pos:pos + 512]
        if block == _ZERO_BLOCK:
            break
        if block[257:262] != b"ustar" or block[156:157] not in (b"0", b"\0"):
            raise _NotPlainUstar
        try:
            checksum = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            name = block[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise _NotPlainUstar from None
        if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise _NotPlainUstar
        name = f"{prefix}/{name}" if prefix else name
        if pos + 512 + size > end:
            raise ValueError(f"{url}: truncated shard: member {name} ends past the end of the file")
        key, ext = base_plus_ext(name)
        if key is None or name.startswith("__") or "/__" in name:
            raise _NotPlainUstar  # names webdataset treats specially
        start, pos = pos + 512, pos + 512 + -(-size // 512) * 512
        yield key, ext.lower(), data[start:start + size]
    if pos + 512 > end:  # no end-of-archive block: the file was cut (tar writers always add one)
        raise ValueError(f"{url}: truncated shard: it ends before its end-of-archive marker")


def tarfile_members(tar: tarfile.TarFile, *, info: bool = False,
                    read: Container[str] = ()) -> Iterator[tuple[str, str, Any]]:
    """``(key, ext, value)`` of the regular members of an open ``tarfile``; meta names and names
    without an extension are skipped, as webdataset skips them.

    Args:
        tar: An archive opened by path (``"r:"``: it seeks over the data it does not read) or as
            a stream (``"r|*"``).
        info: Give each member's ``TarInfo`` (``offset_data``, ``size``) instead of its bytes.
        read: Extensions read as bytes even with ``info`` (e.g. ``cls``, a small label).

    Returns:
        Iterator of triples, the value bytes or a ``TarInfo``.
    """
    for member in tar:
        tar.members = []  # tarfile keeps every header it reads; a long tar need not (as webdataset does)
        if not member.isfile() or META_NAME.match(member.name):
            continue
        key, ext = base_plus_ext(member.name)
        if key is None:
            continue
        ext = ext.lower()
        yield key, ext, member if info and ext not in read else tar.extractfile(member).read()

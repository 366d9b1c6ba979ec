"""Files that appear whole or not at all, and survive a power cut once they have appeared.

A file is written to a temporary name beside its destination (``.{name}.tmp-{pid}-{n}``, which
``verify.find_stray_files`` recognises), flushed and fsynced, renamed over the destination,
and then the directory is fsynced so that the rename itself is on disk. On any error the
temporary file is removed and the original error re-raised; nothing appears under the final name.

Usage::

    atomic_write_bytes(path, data)
    with atomic_writer(path) as f:      # a binary file object; text=True for a text one
        torch.save(state, f)
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_COUNTER = itertools.count()  # distinct temporary names for writers in several threads


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: same directory, so the rename stays on one filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_COUNTER)}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows, which cannot open a directory
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory (EINVAL); the rename is still done
    finally:
        os.close(fd)


def discard_file(f: IO[Any] | None, tmp: str | os.PathLike) -> None:
    """Close ``f`` and delete ``tmp`` after a failure; errors of the close are dropped, the caller re-raises its own."""
    if f is not None:
        try:
            f.close()
        except (OSError, ValueError):
            pass  # a full disk fails the flush inside close; the first error is the one to report
    Path(tmp).unlink(missing_ok=True)


def commit_file(f: IO[Any], tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Flush, fsync and close ``f`` (open on ``tmp``), rename ``tmp`` to ``path`` and fsync the directory.

    On any error ``tmp`` is deleted and the error re-raised; ``path`` is then left as it was.
    """
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        discard_file(f, tmp)
        raise
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, text: bool = False, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Stream a file into place: it appears under ``path`` only when the block exits cleanly.

    Args:
        path: Destination; its directory must exist.
        text: Yield a text file (``encoding``) instead of a binary one.
        encoding: Encoding of a text file.

    Returns:
        A context manager yielding the file object to write to.
    """
    tmp = temp_path(path)
    f = open(tmp, "w", encoding=encoding) if text else open(tmp, "wb")
    try:
        yield f
    except BaseException:
        discard_file(f, tmp)
        raise
    commit_file(f, tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)

"""Output directories: which ones are deitpipe's, one run at a time in each, and removing only
files deitpipe wrote.

deitpipe deletes a file only when both hold: the directory carries deitpipe's own marker (a
label-teacher ``manifest.json``, or a train-student ``config.json`` that names deitpipe), and the
file's name is one deitpipe writes there (exact patterns below). Anything else in an output
directory stays, whatever the flags; a non-empty directory without the marker is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

LOCK_NAME = ".deitpipe.lock"
# Temporary names of deitpipe's atomic writes: ".NAME.tmp-PID" (and a random suffix at most).
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9]+(?:-[0-9A-Za-z_]+)?$")


class OutputError(RuntimeError):
    """An output directory deitpipe must not use; the message is one line."""


def check_output_dir(out: Path, *, owned: bool, option: str = "--out", what: str) -> None:
    """Refuse ``out`` when it is a file, or a non-empty directory that is not deitpipe's.

    Args:
        out: the directory.
        owned: whether it carries deitpipe's marker for this command.
        option: the option that named it, for the message.
        what: the marker, for the message (e.g. "manifest.json of label-teacher").
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a directory; choose a directory")
    if out.is_dir() and not owned and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise OutputError(f"{option} {out} is not empty and holds no {what}; deitpipe writes only into a new or "
                          f"empty directory or one of its own: choose another {option}")


@contextlib.contextmanager
def locked(out: Path, *, command: str) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for this process, so two runs never share it.

    The lock is ``out/.deitpipe.lock`` (flock; the kernel releases it when the process dies, so a
    killed run never leaves it held); it names its holder for the second run's message.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputError(f"{out} is in use by {holder}; wait for it to finish or choose another "
                              "--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_temp_of(path: Path, names: Iterable[str] | re.Pattern) -> bool:
    """Whether ``path`` is a leftover temp file of an atomic write of one of ``names``."""
    m = TEMP_PATTERN.match(path.name)
    if not m or not path.is_file() or path.is_symlink():
        return False
    if isinstance(names, re.Pattern):
        return bool(names.fullmatch(m["name"]))
    return m["name"] in set(names)


def remove_files(paths: Iterable[Path]) -> list[str]:
    """Remove the given regular files (never a link's target, never a directory); returns names."""
    removed = []
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        path.unlink()
        removed.append(path.name)
    return removed


def remove_ray_storage(path: Path) -> bool:
    """Remove Ray Train's storage folder ``path`` when Ray's own marker says it is one."""
    if path.is_symlink() or not (path / ".validate_storage_marker").is_file():
        return False
    shutil.rmtree(path)
    return True

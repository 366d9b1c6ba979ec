"""Output directories: which ones are deitpipe's, one run at a time in each, and removing only
files deitpipe wrote.

deitpipe deletes a file only when both hold: the directory carries deitpipe's own marker (a
label-teacher ``manifest.json``, or a train-student ``config.json`` that names deitpipe), and the
file's name is one deitpipe writes there (exact patterns below). Anything else in an output
directory stays, whatever the flags; a non-empty directory without the marker is refused.

An output may be a local directory or an object-storage prefix (``s3://bucket/prefix``); the same
rules hold for both, and each holds one run at a time (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deitpipe.shards import storage

LOCK_NAME = ".deitpipe.lock"
# Temporary names of deitpipe's atomic writes: ".NAME.tmp-PID" (and a random suffix at most).
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-[0-9]+(?:-[0-9A-Za-z_]+)?$")


class OutputError(RuntimeError):
    """An output directory deitpipe must not use; the message is one line."""


@dataclass(frozen=True)
class Marker:
    """The file that makes an output directory one command's own: the one rule both stages use.

    Attributes:
        name: the file's name in the directory (``manifest.json``, ``config.json``).
        what: how messages name it ("label-teacher manifest.json").
        parse: the file's path -> its content when it is this command's marker, None when it is
            some other tool's file of that name; may raise :class:`OutputError` (one line) for a
            marker of this command that cannot be read.
    """

    name: str
    what: str
    parse: Callable[[str], dict[str, Any] | None]

    def read(self, out: str | Path) -> dict[str, Any] | None:
        """The marker's content in ``out``; None when there is none, or another tool's."""
        path = storage.join(out, self.name)
        return self.parse(path) if storage.is_file(path) else None

    def check(self, out: str | Path, *, option: str = "--out") -> dict[str, Any] | None:
        """:func:`check_output_dir` for this command; returns the marker's content (None: new)."""
        found = self.read(out)
        check_output_dir(out, owned=found is not None, option=option, what=self.what)
        return found


def check_output_dir(out: str | Path, *, owned: bool, option: str = "--out", what: str) -> None:
    """Refuse ``out`` when it is a file, or a non-empty directory that is not deitpipe's.

    Args:
        out: the directory, or an ``s3://`` prefix.
        owned: whether it carries deitpipe's marker for this command.
        option: the option that named it, for the message.
        what: the marker, for the message (e.g. "manifest.json of label-teacher").
    """
    if storage.is_file(out):
        raise OutputError(f"{option} {out} is a file, not a directory; choose a directory")
    if not owned and any(name != LOCK_NAME for name in storage.list_names(out)):
        raise OutputError(f"{option} {out} is not empty and holds no {what}; deitpipe writes only into a new or "
                          f"empty directory or one of its own: choose another {option}")


@contextlib.contextmanager
def locked(out: str | Path, *, command: str) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for this process, so two runs never share it.

    A local directory's lock is ``out/.deitpipe.lock`` (flock; the kernel releases it when the
    process dies, so a killed run never leaves it held), opened without following a link: a
    ``.deitpipe.lock`` that is a link, or anything but a regular file, is refused. An
    object-storage prefix's lock is the object ``prefix/.deitpipe.lock``, created with the
    store's conditional write so that of two runs exactly one gets it, and deleted when the run
    ends; a run that died leaves it, and the message says how to clear it. Either lock names its
    holder for the second run's message.
    """
    holder = f"{command} (pid {os.getpid()} on {socket.gethostname()}, since " \
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')})"
    if storage.is_object_uri(out):
        with _object_lock(os.fspath(out), holder):
            yield
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise OutputError(f"{path} is a symbolic link, which deitpipe did not make; remove the link "
                              "(its target is left alone) or choose another --out") from None
        raise OutputError(f"{path}: cannot open the lock ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{path} is not a regular file; remove it or choose another --out")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputError(f"{out} is in use by {held}; wait for it to finish or choose another "
                              "--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _object_lock(out: str, holder: str) -> Iterator[None]:
    uri = storage.join(out, LOCK_NAME)
    token = f"{holder} [{uuid.uuid4().hex}]\n".encode()
    if not storage.create_exclusive(uri, token):
        try:
            held = storage.read_bytes(uri).decode("utf-8", "replace").strip() or "another run"
        except OSError:
            held = "another run"
        raise OutputError(f"{out} is in use by {held}; wait for it to finish, or, if that run is dead, delete "
                          f"{uri} and rerun")
    try:
        yield
    finally:
        # Ours unless someone cleared it by hand and another run took it since: then it stays.
        with contextlib.suppress(OSError):
            if storage.read_bytes(uri) == token:
                storage.remove(uri)


def is_temp_of(path: Path, names: Iterable[str] | re.Pattern) -> bool:
    """Whether ``path`` is a leftover temp file of an atomic write of one of ``names``."""
    m = TEMP_PATTERN.match(path.name)
    if not m or not path.is_file() or path.is_symlink():
        return False
    if isinstance(names, re.Pattern):
        return bool(names.fullmatch(m["name"]))
    return m["name"] in set(names)


def temp_leftovers(out: str | Path, names: Iterable[str] | re.Pattern) -> list[str]:
    """Leftover temp files (or temporary keys) of atomic writes of ``names`` directly in ``out``."""
    found = []
    for name in storage.list_names(out):
        m = TEMP_PATTERN.match(name)
        if m and (names.fullmatch(m["name"]) if isinstance(names, re.Pattern) else m["name"] in set(names)):
            found.append(storage.join(out, name))
    return found


def remove_files(paths: Iterable[str | Path]) -> list[str]:
    """Remove the given regular files or objects (never a link's target, never a directory);
    returns their names."""
    return [os.fspath(path).rsplit("/", 1)[-1] for path in paths if storage.remove(path)]


def remove_ray_storage(path: str | Path) -> bool:
    """Remove Ray Train's storage folder ``path`` when Ray's own marker says it is one."""
    if storage.is_object_uri(path):
        if not storage.is_file(storage.join(path, RAY_MARKER)):
            return False
        storage.remove_tree(path)
        return True
    path = Path(path)
    if path.is_symlink() or not (path / RAY_MARKER).is_file():
        return False
    shutil.rmtree(path)
    return True


RAY_MARKER = ".validate_storage_marker"  # Ray Train writes it into every storage folder it uses

"""Atomic, durable writes: nothing but the old file after a failure, fsyncs of file and directory."""

from __future__ import annotations

import builtins
import errno
import os
import stat

import pytest

from deitpipe.shards.format.manifest import write_json_atomic, write_manifest
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.shards.storage.atomic import atomic_write_bytes, atomic_writer, fsync_dir


@pytest.fixture()
def fsyncs(monkeypatch):
    """Record every os.fsync as ``("dir" | "file", inode)``, in order."""
    calls: list[tuple[str, int]] = []
    real = os.fsync

    def record(fd):
        st = os.fstat(fd)
        calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def _write_shard(out, sample_maker):
    with ShardFileWriter(out, "shard-000000.tar") as w:
        w.write(encode_sample(**sample_maker(0)))
    return out / "shard-000000.tar"


@pytest.mark.parametrize("how", ["bytes", "stream", "json", "manifest", "shard"])
def test_file_fsynced_before_rename_and_directory_after(tmp_path, fsyncs, sample_maker, how):
    path = tmp_path / ("manifest.json" if how == "manifest" else "out.bin")
    if how == "bytes":
        atomic_write_bytes(path, b"abc")
    elif how == "stream":
        with atomic_writer(path) as f:
            f.write(b"ab")
            f.write(b"c")
    elif how == "json":
        write_json_atomic(path, {"a": 1})
    elif how == "manifest":
        write_manifest(tmp_path, {"shards": []})
    else:
        path = _write_shard(tmp_path, sample_maker)
    assert fsyncs == [("file", path.stat().st_ino), ("dir", tmp_path.stat().st_ino)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_fsync_dir_tolerates_platforms_that_cannot(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    fsync_dir(tmp_path)  # no error: the rename is done, only its durability is the filesystem's
    fsync_dir(tmp_path / "missing")


class _FullDisk:
    """A file whose writes (``fail="write"``) or final close (``fail="close"``) hit a full disk."""

    def __init__(self, f, fail):
        self._f, self._fail = f, fail

    def write(self, data):
        if self._fail == "write":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def close(self):
        if not self._f.closed:
            self._f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # buffered data could not be flushed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture()
def full_disk(monkeypatch):
    """``full_disk("write" | "close")``: temporary files opened from then on fail that way."""
    real = builtins.open

    def start(fail):
        def fake_open(file, *args, **kw):
            f = real(file, *args, **kw)
            return _FullDisk(f, fail) if ".tmp-" in str(file) else f

        monkeypatch.setattr(builtins, "open", fake_open)

    return start


@pytest.mark.parametrize("fail", ["write", "close"])
@pytest.mark.parametrize("how", ["shard", "json", "bytes"])
def test_full_disk_leaves_no_temporary_file_and_the_old_file_intact(tmp_path, sample_maker, full_disk, fail, how):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "manifest.json"
    old.write_text("{}")  # an earlier version beside it must survive
    full_disk(fail)
    with pytest.raises(OSError) as err:
        if how == "shard":
            _write_shard(out, sample_maker)
        elif how == "json":
            write_json_atomic(old, {"shards": [1, 2, 3]})
        else:
            atomic_write_bytes(out / "student.pt", b"x" * 100)
    assert err.value.errno == errno.ENOSPC  # the original error, not one of the cleanup
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert old.read_text() == "{}"


def test_an_error_inside_the_block_removes_the_temporary_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_writer(tmp_path / "a.bin") as f:
            f.write(b"new")
            raise RuntimeError("stop")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old"
    with atomic_writer(tmp_path / "b.txt", text=True) as f:
        f.write("ünïcode\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "ünïcode\n"

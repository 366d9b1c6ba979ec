"""A run's files after a kill, a full disk or damage: a resume goes on, errors are one line naming
the file, and the local Ray's token is out of others' reach from the moment it is written."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from deitpipe.shards.storage import atomic
from deitpipe.student.runfiles import (
    CheckpointWriteError,
    FileCheckpoints,
    truncate_metrics,
    append_jsonl,
    checkpoint_files,
    latest_checkpoint,
    load_state,
    read_metrics,
    save_weights,
)

TORN = '{"epoch": 3, "lo'  # what a run killed while writing its fourth line leaves


def _metrics(path: Path, epochs: int, tail: str = "") -> None:
    lines = [json.dumps({"epoch": e, "loss": 1.0 / (e + 1), "step": 5 * (e + 1)}) for e in range(epochs)]
    path.write_text("".join(line + "\n" for line in lines) + tail)


# metrics.jsonl


@pytest.mark.parametrize("start_epoch, kept", [(2, [0, 1]), (3, [0, 1, 2]), (9, [0, 1, 2])])
def test_a_cut_off_last_line_does_not_stop_a_resume(tmp_path, start_epoch, kept):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, 3, TORN)
    truncate_metrics(str(path), start_epoch)
    assert [r["epoch"] for r in read_metrics(path)] == kept
    assert TORN not in path.read_text() and path.read_text().endswith("}\n")


def test_damaged_lines_are_skipped_wherever_they_are(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"epoch": e, "loss": 0.5}) for e in range(4)]
    path.write_text("\n".join([good[0], '{"epoch": 1, "lo\x00ss', good[1], "", "[1, 2]", "7", good[2],
                               "not json", good[3]]) + "\n" + TORN)
    assert [r["epoch"] for r in read_metrics(path)] == [0, 1, 2, 3]
    truncate_metrics(str(path), 3)
    assert path.read_text() == "".join(line + "\n" for line in good[:3])
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_a_record_appended_after_a_torn_line_stays_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, 3, TORN)
    append_jsonl(path, {"epoch": 3, "loss": 0.25, "step": 20})
    assert [r["epoch"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert path.read_text().splitlines()[-2:] == [TORN, '{"epoch": 3, "loss": 0.25, "step": 20}']
    append_jsonl(path, {"epoch": 4})  # an intact file gets no blank line
    assert path.read_text().endswith('"step": 20}\n{"epoch": 4}\n')
    fresh = tmp_path / "fresh.jsonl"
    append_jsonl(fresh, {"epoch": 0})
    assert fresh.read_text() == '{"epoch": 0}\n'


# Writing checkpoints on a full disk


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left."""

    room = 0

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.fixture(params=[0, 100, "fsync"])
def full_disk(request, monkeypatch):
    """The disk fills at the first byte, within the file, or when the file is flushed to disk."""
    if request.param == "fsync":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", fsync)
        return
    room = request.param

    def full_open(path, mode="r", *args, **kwargs):
        f = _FullDisk(path, "w")
        f.room = room
        return f

    monkeypatch.setattr(atomic, "open", full_open, raising=False)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "inline_container" not in text
    return text


def test_a_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk):
    state = {"epoch": 3, "step": 30, "model": {"w": torch.zeros(64)}}
    with pytest.raises(CheckpointWriteError) as caught:
        FileCheckpoints(tmp_path)(state, {})
    text = _one_line(caught.value)
    assert str(tmp_path / "checkpoints" / "epoch-0003.pt") in text and "no space left on device" in text
    assert isinstance(caught.value, OSError)  # the command line shows it as it is
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_weights_on_a_full_disk_are_one_line_and_the_old_ones_stay(tmp_path, full_disk):
    path = tmp_path / "student.pt"
    path.write_bytes(b"the previous epoch's weights")
    with pytest.raises(CheckpointWriteError, match="no space left on device") as caught:
        save_weights({"w": torch.zeros(64)}, path)
    assert str(path) in _one_line(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["student.pt"]
    assert path.read_bytes() == b"the previous epoch's weights"


@pytest.mark.parametrize("message, cause", [
    ("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nframe #0: c10::Error", "unexpected pos 64"),
    ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
     "No space left on device", "no space left on device"),
])
def test_torchs_own_write_failure_names_the_file(tmp_path, monkeypatch, message, cause):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a zip")
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError) as caught:
        save_weights({"w": torch.zeros(2)}, tmp_path / "student.pt")
    text = str(caught.value)
    assert "\n" not in text and str(tmp_path / "student.pt") in text and cause in text
    assert list(tmp_path.iterdir()) == []


# Reading checkpoints that are not what they should be


def _saved(tmp_path: Path, state) -> bytes:
    torch.save(state, tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


@pytest.mark.parametrize("kind, says", [
    ("garbage", "is not a torch checkpoint"),
    ("json", "is not a torch checkpoint"),
    ("empty", "is empty, not a torch checkpoint"),
    ("first bytes", "is a cut-off or corrupt torch checkpoint"),
    ("half", "is a cut-off or corrupt torch checkpoint"),
    ("all but 5 bytes", "is a cut-off or corrupt torch checkpoint"),
    ("a tensor", "holds a Tensor, not a checkpoint dict"),
    ("another class", "holds a fractions.Fraction"),
])
def test_a_checkpoint_asked_for_that_does_not_load_is_one_line_naming_it(tmp_path, kind, says):
    data = _saved(tmp_path, {"epoch": 1, "model": {"w": torch.zeros(256)}})
    content = {"garbage": bytes(range(256)) * 2, "json": json.dumps({"epoch": 1}).encode(), "empty": b"",
               "first bytes": data[:10], "half": data[:len(data) // 2], "all but 5 bytes": data[:-5]}
    path = tmp_path / "epoch-0001.pt"
    if kind == "a tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "another class":
        torch.save({"epoch": 1, "lr": Fraction(1, 3)}, path)
    else:
        path.write_bytes(content[kind])
    with pytest.raises(ValueError) as caught:
        load_state(path)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(str(path)) and says in text


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="epoch-0001.pt"):
        load_state(tmp_path / "epoch-0001.pt")


def test_the_newest_checkpoint_that_loads_is_taken(tmp_path):
    save = FileCheckpoints(tmp_path, keep=5)
    for epoch in range(5):
        save({"epoch": epoch, "step": 10 * epoch}, {})
    paths = [Path(p) for p in checkpoint_files(tmp_path)]
    paths[4].write_text(json.dumps({"epoch": 4}))
    assert latest_checkpoint(tmp_path)["epoch"] == 3
    torch.save({"epoch": 3, "lr": Fraction(1, 3)}, paths[3])  # loading it would run code
    assert latest_checkpoint(tmp_path)["epoch"] == 2
    paths[2].write_bytes(b"")
    torch.save(torch.zeros(2), paths[1])
    assert latest_checkpoint(tmp_path)["epoch"] == 0


# The local Ray's token


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    """ray.init as Ray 2.52-2.60 starts a local instance with token authentication: in this
    process, ``~/.ray`` made with ``mkdir(parents=True, exist_ok=True)`` and the token written with
    a plain ``open``. Records what others could do with the token at that moment."""
    from deitpipe.pipeline import raysession

    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.parent.mkdir()
    seen = {}

    def init(**kwargs):
        token.parent.mkdir(parents=True, exist_ok=True)
        with open(token, "w") as f:
            f.write("0123456789abcdef")
        seen.update(dir=stat.S_IMODE(token.parent.stat().st_mode), file=stat.S_IMODE(token.stat().st_mode))

    monkeypatch.setattr(raysession, "RAY_TOKEN", token)
    monkeypatch.setattr(raysession.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raysession.ray, "init", init)
    monkeypatch.setattr(raysession.ray, "shutdown", lambda: None)
    before = os.umask(0o022)  # the usual umask, under which Ray's token is world-readable
    try:
        yield raysession, token, seen
    finally:
        os.umask(before)


@pytest.mark.parametrize("home", ["no .ray yet", ".ray open to all", ".ray private"])
def test_a_local_rays_token_is_out_of_others_reach_from_its_creation(fake_ray, home):
    raysession, token, seen = fake_ray
    if home != "no .ray yet":
        token.parent.mkdir(mode=0o755 if home == ".ray open to all" else 0o700)
        token.parent.chmod(0o755 if home == ".ray open to all" else 0o700)
    with raysession.ray_session(None, num_cpus=1):
        assert seen["dir"] == 0o700  # no one else can enter ~/.ray while the token is written
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert os.umask(0o022) == 0o022  # the process's umask is as it was (Ray's processes inherit it)


def test_an_earlier_world_readable_token_is_closed_before_ray_starts(fake_ray):
    raysession, token, seen = fake_ray
    token.parent.mkdir()
    token.write_text("an earlier run's token")
    token.chmod(0o644)
    with raysession.ray_session(None, num_cpus=1):
        pass
    assert seen == {"dir": 0o700, "file": 0o600}  # closed before ray.init rewrites it in place
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_metrics_and_checkpoints_in_a_bucket_behave_as_on_disk(s3_bucket):
    from deitpipe.shards import storage

    path = f"{s3_bucket}/run/metrics.jsonl"
    storage.write_bytes(path, b'{"epoch": 0}\n{"epoch": 1}\n' + TORN.encode())
    append_jsonl(path, {"epoch": 2})
    assert [r["epoch"] for r in read_metrics(path)] == [0, 1, 2]
    truncate_metrics(path, 2)
    assert storage.read_bytes(path) == b'{"epoch": 0}\n{"epoch": 1}\n'
    storage.write_bytes(f"{s3_bucket}/run/epoch-0001.pt", b'{"epoch": 1}')
    with pytest.raises(ValueError, match=f"^{s3_bucket}/run/epoch-0001.pt is not a torch checkpoint"):
        load_state(f"{s3_bucket}/run/epoch-0001.pt")

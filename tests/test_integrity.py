"""A label set is checked where it is used, and no link, flag or second run turns deitpipe against
a user's file: locks that are links, outputs reached through links, shards changed behind their
manifest, a resume onto another label set, two runs into one bucket prefix."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import complete_shard_set, one_line_error, run_cli, write_digit_folder, write_teacher
from deitpipe.pipeline.outdir import LOCK_NAME, OutputError, locked
from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.reader import ShardChangedError, decode_sample, read_shard
from deitpipe.student.data import ShardReplay
from deitpipe.student.gpu_replay import EncodedShardReplay

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
        "--batch-size", "4", "--rand-augment", "-1", "--launcher", "local", "--no-progress"]


_run, _one_line_error = run_cli, one_line_error


def _label_args(data, out, weights, *extra):
    return ["label-teacher", "--data", data, "--out", out, "--teacher", "resnet18", "--teacher-weights", weights,
            "--views", "2", "--topk", "2", "--shard-size", "4", "--device", "cpu", "--no-progress", *extra]


def _shards(folder: Path, n: int = 16) -> Path:
    return complete_shard_set(folder, n)


def _flip_byte(path: Path, offset: int = 700) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- links ------------------------------------------------------------------------------------


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"a user's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        with locked(out, command="deitpipe label-teacher"):
            pass
    assert victim.read_bytes() == b"a user's file"
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs")
    line = _one_line_error(_run(*_label_args(data, out, weights)))
    assert "symbolic link" in line and LOCK_NAME in line
    assert victim.read_bytes() == b"a user's file"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_an_out_reached_through_a_link_into_data_is_refused(tmp_path):
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    (tmp_path / "elsewhere").symlink_to(data)
    line = _one_line_error(_run(*_label_args(data, tmp_path / "elsewhere" / "shards", weights)))
    assert "lies inside --data" in line
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no new "class" folder


# -- a shard changed behind its manifest ------------------------------------------------------


def test_read_shard_checks_the_manifest_digest(tmp_path):
    folder = _shards(tmp_path / "s")
    entry = json.loads((folder / schema.MANIFEST_NAME).read_text())["shards"][1]
    path = folder / entry["name"]
    assert len(read_shard(str(path), sha256=entry["sha256"])) == 8
    _flip_byte(path)
    with pytest.raises(ShardChangedError, match=entry["name"]):
        read_shard(str(path), sha256=entry["sha256"])


@pytest.mark.parametrize("replay", [ShardReplay, EncodedShardReplay])
def test_both_loaders_stop_at_a_changed_shard(tmp_path, replay):
    folder = _shards(tmp_path / "s")
    entries = json.loads((folder / schema.MANIFEST_NAME).read_text())["shards"]
    urls = [str(folder / e["name"]) for e in entries]
    _flip_byte(folder / entries[0]["name"])
    data = replay(urls=urls, num_classes=10, num_views=3, teacher_labels="views", img_size=16, batch_size=4,
                  steps=4, checksums={u: e["sha256"] for u, e in zip(urls, entries)})
    with pytest.raises(ShardChangedError, match=entries[0]["name"]):
        list(data)


def test_train_student_stops_in_one_line_on_a_shard_changed_after_its_manifest(tmp_path):
    folder = _shards(tmp_path / "s")
    _flip_byte(folder / schema.shard_name(1))
    line = _one_line_error(_run("train-student", "--shards", folder, "--out", tmp_path / "run", "--epochs", "1",
                                *TINY))
    assert schema.shard_name(1) in line and "sha256" in line and "changed" in line


def test_a_resume_onto_another_label_set_is_refused(tmp_path):
    folder = _shards(tmp_path / "s")
    args = ["train-student", "--shards", folder, "--out", tmp_path / "run", "--epochs", "2", *TINY]
    assert _run(*args, "--stop-after-steps", "4").exit_code == 0  # one epoch of 4 steps, then stopped
    assert json.loads((tmp_path / "run" / "config.json").read_text())["manifest_sha256"]
    manifest = json.loads((folder / schema.MANIFEST_NAME).read_text())
    manifest["created"] = "relabelled"  # what a label-teacher --overwrite leaves: another manifest
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    line = _one_line_error(_run(*args))
    assert "another label set" in line and "--overwrite" in line


# -- messages that name their file ------------------------------------------------------------


def test_an_object_dtype_member_names_its_shard_and_sample():
    from io import BytesIO

    buf = BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raw = {"__key__": "000007", "__url__": "s/shard-000003.tar", "png": b"x", schema.CLS: b"1",
           schema.META: b"{}", schema.VIEWS: buf.getvalue()}
    with pytest.raises(ValueError, match=r"shard-000003\.tar: sample 000007: views\.npy: .*Python objects"):
        decode_sample(raw)


def test_a_label_outside_the_classes_names_its_sample(tmp_path):
    folder = _shards(tmp_path / "s")
    urls = [str(folder / schema.shard_name(s)) for s in range(2)]
    data = ShardReplay(urls=urls, num_classes=5, num_views=3, teacher_labels="none", img_size=16, batch_size=4, steps=4)
    with pytest.raises(ValueError, match=r"shard-00000[01]\.tar: sample \w+ has label [5-9], outside the 5 classes"):
        list(data)


def test_a_batch_larger_than_the_label_set_is_refused(tmp_path):
    folder = _shards(tmp_path / "s")
    line = _one_line_error(_run("train-student", "--shards", folder, "--out", tmp_path / "run", *TINY,
                                "--batch-size", "32"))  # the last value counts
    assert "--batch-size 32" in line and "16 samples" in line
    assert not (tmp_path / "run").exists()


def test_label_device_cuda_without_a_gpu_is_an_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs")
    args = [a if a != "cpu" else "cuda" for a in _label_args(data, tmp_path / "out", weights)]
    line = _one_line_error(_run(*args))
    assert "--device cuda" in line and "no CUDA GPU" in line
    assert not (tmp_path / "out").exists()


# -- label-teacher reruns ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_label_rerun_relabels_a_shard_changed_in_place_and_deletes_only_what_it_replaces(tmp_path, ray_local):
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs", n=12)
    out = tmp_path / "out"
    assert _run(*_label_args(data, out, weights)).exit_code == 0
    first = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert [e["name"] for e in first["shards"]] == [schema.shard_name(s) for s in range(3)]
    original = (out / schema.shard_name(0)).read_bytes()
    _flip_byte(out / schema.shard_name(0))  # same size, other bytes
    stray = out / schema.shard_name(99)  # a name deitpipe uses, but neither listed nor planned
    stray.write_bytes(b"someone's tar")
    result = _run(*_label_args(data, out, weights))
    assert result.exit_code == 0, result.output
    assert (out / schema.shard_name(0)).read_bytes() == original  # labelled again, not called complete
    assert stray.read_bytes() == b"someone's tar"
    # Other arguments with --overwrite: 12 images in shards of 8 -> 2 shards; the old third shard,
    # listed by the old manifest, goes; the stray stays.
    result = _run(*_label_args(data, out, weights, "--shard-size", "8", "--overwrite"))  # the last value counts
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [schema.shard_name(0), schema.shard_name(1),
                                                              schema.shard_name(99)]
    assert stray.read_bytes() == b"someone's tar"


# -- object storage ---------------------------------------------------------------------------


def test_one_run_at_a_time_in_a_bucket_prefix(s3_bucket):
    prefix = f"{s3_bucket}/shards"
    lock = storage.join(prefix, LOCK_NAME)
    with locked(prefix, command="deitpipe label-teacher"):
        assert "deitpipe label-teacher" in storage.read_bytes(lock).decode()
        with pytest.raises(OutputError, match="is in use by deitpipe label-teacher"):
            with locked(prefix, command="deitpipe label-teacher"):
                pass
    assert not storage.is_file(lock)  # released
    # Two runs starting at once: the store's conditional write lets exactly one in.
    won = []
    barrier = threading.Barrier(2)

    def start():
        barrier.wait()
        won.append(storage.create_exclusive(storage.join(prefix, "race"), b"x"))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False, True]


def test_a_dead_runs_lock_in_a_bucket_is_named_with_how_to_clear_it(tmp_path, s3_bucket):
    prefix = f"{s3_bucket}/shards"
    storage.write_bytes(storage.join(prefix, LOCK_NAME), b"deitpipe label-teacher (pid 4242 on gone-host)\n")
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs")
    line = _one_line_error(_run(*_label_args(data, prefix, weights, "--overwrite")))
    assert "pid 4242 on gone-host" in line and f"delete {prefix}/{LOCK_NAME}" in line
    assert storage.list_names(prefix) == [LOCK_NAME]  # nothing written beside it


def test_a_missing_bucket_is_named_as_a_bucket(tmp_path, s3_bucket):
    line = _one_line_error(_run("train-student", "--shards", f"{s3_bucket}-gone/shards", "--out",
                                tmp_path / "run", *TINY))
    assert "no such bucket" in line

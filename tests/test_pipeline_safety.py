"""Commands never delete what deitpipe did not write, refuse what is not theirs, never hang."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import one_line_error, run_cli, write_digit_folder, write_shard_set, write_teacher
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.outdir import LOCK_NAME, OutputError, locked
from deitpipe.pipeline.train import RUN_MARKER, TrainError, _prepare_out
from deitpipe.shards.format import schema
from deitpipe.student.data import Augment, ShardReplay

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
        "--batch-size", "4", "--num-workers", "1", "--cpus-per-worker", "1", "--rand-augment", "-1",
        "--launcher", "local", "--no-progress"]


_run, _one_line_error = run_cli, one_line_error


def _plant(folder: Path) -> dict[str, bytes]:
    """A user's files: names that look like deitpipe's (tars, temp names, config.json) and others."""
    files = {"backup.tar": b"my backup", "report.tmp-final.txt": b"report", "x.tmp-y": b"x",
             "important.txt": b"keep me", "src/main.py": b"print('hi')\n", "nested/deep/shard-000000.tar": b"n",
             "config.json": json.dumps({"lr": 0.1, "tool": "other"}).encode()}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _survived(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel


def _label_args(data, out, weights, *extra):
    return ["label-teacher", "--data", data, "--out", out, "--teacher", "resnet18", "--teacher-weights", weights,
            "--views", "2", "--topk", "2", "--shard-size", "4", "--device", "cpu", "--no-progress", *extra]


def _shards(folder: Path, n: int = 16, **kw) -> Path:
    write_shard_set(folder, num_samples=n, shard_size=8, views=3, topk=3, num_classes=10, **kw)
    manifest = json.loads((folder / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_label_teacher_refuses_a_foreign_folder_and_deletes_nothing(tmp_path, flags):
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs")
    victim = tmp_path / "victim"
    files = _plant(victim)
    line = _one_line_error(_run(*_label_args(data, victim, weights, *flags)))
    assert "not empty" in line and "manifest.json" in line
    _survived(victim, files)
    assert not (victim / LOCK_NAME).exists() and not (victim / schema.MANIFEST_NAME).exists()


def test_label_teacher_refuses_inputs_inside_its_output(tmp_path):
    weights = write_teacher(tmp_path / "t.pt")
    victim = tmp_path / "victim"
    victim.mkdir()
    write_shard_set(victim, num_samples=4, shard_size=2)  # WebDataset tars with .cls: valid inputs
    tars = {p.name: p.read_bytes() for p in victim.glob("*.tar")}
    (victim / schema.MANIFEST_NAME).unlink()
    for name in tars:  # named as a user would name inputs
        (victim / name).rename(victim / name.replace("shard-", "train-"))
    line = _one_line_error(_run(*_label_args(str(victim / "train-{000000..000001}.tar"), victim, weights,
                                              "--overwrite")))
    assert "inside --out" in line
    assert sorted(p.name for p in victim.iterdir()) == ["train-000000.tar", "train-000001.tar"]


def test_train_student_refuses_a_foreign_folder_even_with_overwrite(tmp_path):
    shards = _shards(tmp_path / "shards")
    project = tmp_path / "project"
    files = _plant(project)
    for flags in ([], ["--overwrite"]):
        line = _one_line_error(_run("train-student", "--shards", shards, "--out", project, *TINY, *flags))
        assert "not empty" in line and "config.json" in line
        _survived(project, files)


def test_out_that_is_a_file_is_one_line(tmp_path):
    shards = _shards(tmp_path / "shards")
    (tmp_path / "afile").write_text("x")
    assert "is a file" in _one_line_error(_run("train-student", "--shards", shards, "--out", tmp_path / "afile",
                                                *TINY))
    assert (tmp_path / "afile").read_text() == "x"


def test_shards_without_samples_are_refused_before_training(tmp_path):
    shards = _shards(tmp_path / "shards", n=0)
    line = _one_line_error(_run("train-student", "--shards", shards, "--out", tmp_path / "run", *TINY))
    assert "no samples" in line and not (tmp_path / "run").exists()


def test_replay_of_empty_shards_stops_instead_of_cycling(tmp_path):
    from deitpipe.shards.format.writer import ShardFileWriter

    shards = tmp_path / "shards"
    with ShardFileWriter(shards, schema.shard_name(0)):  # a complete shard with no samples
        pass
    ds = ShardReplay(urls=[str(shards / schema.shard_name(0))], num_classes=10, num_views=2,
                     teacher_labels="views", img_size=16, batch_size=2, steps=3,
                     augment=Augment(rand_augment=None, random_erasing=0.0))
    with pytest.raises(ValueError, match="hold no samples"):
        next(iter(ds))


def test_worker_side_mistakes_are_caught_on_the_driver_before_anything_is_written(tmp_path):
    shards = _shards(tmp_path / "shards")
    run = tmp_path / "run"
    line = _one_line_error(_run("train-student", "--shards", shards, "--out", run, *TINY,
                                "--finetune", tmp_path / "missing.pt"))
    assert "missing.pt" in line and not run.exists()
    line = _one_line_error(_run("train-student", "--shards", shards, "--out", run, *TINY, "--random-erasing", "2"))
    assert "--random-erasing" in line and not run.exists()
    line = _one_line_error(_run("train-student", "--shards", shards, "--out", run, *TINY, "--val", tmp_path / "nope"))
    assert "nope" in line and not run.exists()


def test_a_run_that_never_finished_an_epoch_is_replaced_by_a_corrected_one(tmp_path):
    shards = _shards(tmp_path / "shards")
    out = tmp_path / "run"
    base = dict(shards=str(shards), out=str(out), epochs=2, batch_size=4, img_size=16, patch_size=4, embed_dim=32,
                depth=1, num_heads=2)
    _prepare_out(out, TrainConfig(**base, lr=1.0), num_classes=10, manifest="m")  # then it failed
    _prepare_out(out, TrainConfig(**base, lr=0.1), num_classes=10, manifest="m")  # corrected: accepted
    written = json.loads((out / "config.json").read_text())
    assert written["lr"] == 0.1 and written[RUN_MARKER].startswith("deitpipe train-student")
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n")  # now it has trained
    with pytest.raises(TrainError, match="--lr"):
        _prepare_out(out, TrainConfig(**base, lr=0.5), num_classes=10, manifest="m")


def test_a_second_run_into_a_locked_out_is_refused_with_its_holder(tmp_path):
    shards = _shards(tmp_path / "shards")
    out = tmp_path / "run"
    with locked(out, command="deitpipe train-student"):
        line = _one_line_error(_run("train-student", "--shards", shards, "--out", out, *TINY))
        assert f"pid {os.getpid()}" in line and "in use" in line
        with pytest.raises(OutputError, match="in use"):
            with locked(out, command="again"):
                pass
    with locked(out, command="after"):  # released on exit
        pass


@pytest.mark.ray
@pytest.mark.slow
def test_own_outputs_with_planted_files_keep_the_users_files(tmp_path):
    ray = pytest.importorskip("ray")
    weights, data = write_teacher(tmp_path / "t.pt"), write_digit_folder(tmp_path / "imgs", n=8)
    shards, run = tmp_path / "shards", tmp_path / "run"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    try:
        assert _run(*_label_args(data, shards, weights)).exit_code == 0
        planted = {"backup.tar": b"b", "x.tmp-y": b"x", "notes/shard-000000.tar": b"n", "readme.txt": b"r"}
        for rel, body in planted.items():
            (shards / rel).parent.mkdir(exist_ok=True)
            (shards / rel).write_bytes(body)
        (shards / ".shard-000007.tar.tmp-4242-0").write_bytes(b"partial")  # an interrupted write of ours
        result = _run(*_label_args(data, shards, weights, "--views", "1", "--overwrite"))
        assert result.exit_code == 0, result.output
        _survived(shards, planted)
        assert not (shards / ".shard-000007.tar.tmp-4242-0").exists()
        assert json.loads((shards / schema.MANIFEST_NAME).read_text())["views"] == 1

        assert _run("train-student", "--shards", shards, "--out", run, *TINY, "--epochs", "1").exit_code == 0
        theirs = {"important.txt": b"keep", "src/main.py": b"code", "ray-notes/x": b"y"}
        for rel, body in theirs.items():
            (run / rel).parent.mkdir(exist_ok=True)
            (run / rel).write_bytes(body)
        result = _run("train-student", "--shards", shards, "--out", run, *TINY, "--epochs", "1", "--lr", "1e-3",
                      "--overwrite")
        assert result.exit_code == 0, result.output
        _survived(run, theirs)
        config = json.loads((run / "config.json").read_text())
        assert config["lr"] == 1e-3 and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_label_teacher_that_labels_nothing_fails_and_leaves_the_manifest_incomplete(tmp_path):
    ray = pytest.importorskip("ray")
    weights = write_teacher(tmp_path / "t.pt")
    data = tmp_path / "bad"
    for i in range(3):
        (data / "a").mkdir(parents=True, exist_ok=True)
        (data / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(20))  # JPEG magic, nothing after
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    try:
        line = _one_line_error(_run(*_label_args(data, tmp_path / "out", weights)))
    finally:
        ray.shutdown()
    assert "none of 3 inputs could be labelled" in line and "same arguments" not in line
    assert json.loads((tmp_path / "out" / schema.MANIFEST_NAME).read_text())["complete"] is False
    refused = _one_line_error(_run("train-student", "--shards", tmp_path / "out", "--out", tmp_path / "s", *TINY))
    # The student names the cause, not "rerun label-teacher with the same arguments", which cannot help.
    assert "could label none of its 3 inputs" in refused and "0.jpg" in refused
    assert "same arguments" not in refused


def test_images_over_max_pixels_are_skipped_with_their_reason(tmp_path):
    from deitpipe.teacher import Preprocessing
    from deitpipe.teacher.labelling import decode_chunk

    ok, big = tmp_path / "ok.png", tmp_path / "big.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(ok)
    Image.new("1", (400, 300)).save(big)  # a few hundred bytes on disk, 120,000 pixels decoded
    items = [{"index": i, "path": str(p), "label": 0, "kind": "file", "ref": str(p), "size": 0, "data": None,
              "offset": 0, "length": 0} for i, p in enumerate((ok, big))]
    prep = Preprocessing(resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    out = decode_chunk(items, seed=0, views=1, prep=prep.to_dict(), max_pixels=100_000)
    assert out["ok"].tolist() == [True, False]
    assert out["reason"][1].startswith("decompression bomb") and "100000" in out["reason"][1]
    assert decode_chunk(items, seed=0, views=1, prep=prep.to_dict(), max_pixels=200_000)["ok"].all()


def test_rays_token_is_made_owner_only(tmp_path):
    from deitpipe.pipeline.raysession import owner_only

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    owner_only(token)
    assert token.stat().st_mode & 0o777 == 0o600
    owner_only(tmp_path / "missing")  # nothing to do


@pytest.mark.ray
def test_a_local_ray_leaves_its_token_owner_only():
    pytest.importorskip("ray")
    from deitpipe.pipeline.raysession import RAY_TOKEN, ray_session

    with ray_session(None, num_cpus=1):
        if RAY_TOKEN.exists():
            assert RAY_TOKEN.stat().st_mode & 0o077 == 0

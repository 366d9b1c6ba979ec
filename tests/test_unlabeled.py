"""Images without labels: the teacher labels them alone, and students learn from several shard
sets, some of them without true labels."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_cli, make_sample, write_digit_folder, write_teacher
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.train import TrainError, shard_sets_info, train_student
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import write_manifest
from deitpipe.shards.format.plan import plan_shards
from deitpipe.shards.format.reader import iter_samples
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.shards.inputs import resolve_source
from deitpipe.shards.inputs.embedded import digits_split, few_labels_split
from deitpipe.student.data import ShardReplay
from deitpipe.student.gpu_replay import EncodedShardReplay
from deitpipe.student.runfiles import checkpoint_files, read_metrics

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, rand_augment=None, random_erasing=0.0,
            mixup=0.0, cutmix=0.0)
CLI_TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
            "--rand-augment", "-1", "--random-erasing", "0", "--mixup", "0", "--cutmix", "0", "--epochs", "3",
            "--batch-size", "8", "--warmup-epochs", "1", "--lr", "5e-3", "--cpus-per-worker", "1", "--no-progress",
            "--launcher", "local", "--distillation", "hard"]


_run, _one_line_error = run_cli, one_line_error


def _set(folder: Path, n: int, *, labelled: bool, first: int = 0, teacher: str = "resnet18",
         classes: int = 10) -> Path:
    """A complete shard set of ``n`` samples (keys from ``first``), with or without true labels."""
    samples = [make_sample(first + i, views=3, topk=3, num_classes=classes) for i in range(n)]
    entries = []
    for s, part in enumerate(plan_shards(n, 8)):
        with ShardFileWriter(folder, schema.shard_name(s)) as w:
            for i in part:
                w.write(encode_sample(**{**samples[i], "label": samples[i]["label"] if labelled else -1}))
        entries.append({**w.record(), "first_index": part.start, "unlabeled": 0 if labelled else len(part)})
    write_manifest(folder, {"num_classes": classes, "views": 3, "topk": 3, "full_softmax": False, "shards": entries,
                            "complete": True, "teacher": {"name": teacher},
                            "class_names": [str(i) for i in range(classes)]})
    return folder


@pytest.fixture()
def two_sets(tmp_path):
    return _set(tmp_path / "labelled", 16, labelled=True), _set(tmp_path / "unlabelled", 24, labelled=False, first=100)


# -- inputs -----------------------------------------------------------------------------------


def test_embedded_few_label_splits_cut_the_training_split_and_leave_val_alone():
    train, val = digits_split()
    labelled, rest = few_labels_split(10)
    assert len(labelled) == 100 and not set(labelled) & set(rest) and set(labelled) | set(rest) == set(train)
    assert not (set(labelled) | set(rest)) & set(val)
    few = resolve_source("cluttered-digits:labeled-10")
    assert sorted(np.bincount([c.label for c in few.candidates])) == [10] * 10
    assert {c.label for c in resolve_source("cluttered-digits:unlabeled-10").candidates} == {-1}
    assert set(few_labels_split(5)[0]) <= set(labelled)  # labeled-5 is part of labeled-10


def test_a_folder_without_class_folders_is_listed_recursively_without_labels(tmp_path):
    (tmp_path / "pool" / "deep" / "er").mkdir(parents=True)
    for rel in ("a.png", "deep/b.png", "deep/er/c.png"):
        Image.new("RGB", (12, 12), (40, 80, 120)).save(tmp_path / "pool" / rel)
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    source = resolve_source(str(tmp_path / "pool"), unlabeled=True)
    assert [c.path for c in source.candidates] == ["a.png", "deep/b.png", "deep/er/c.png"]
    assert {c.label for c in source.candidates} == {-1} and source.ignored == ["notes.txt"]


@pytest.mark.parametrize("kind", ["folder", "tars"])
def test_label_teacher_unlabeled_stores_no_true_label_and_counts_them(tmp_path, kind):
    weights = write_teacher(tmp_path / "t.pt")
    if kind == "folder":
        data = write_digit_folder(tmp_path / "imgs", n=6)
    else:
        data = tmp_path / "in.tar"
        with tarfile.open(data, "w") as tar:
            for i in range(6):
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (i * 30, 50, 90)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"img{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))  # no .cls member
    args = ["label-teacher", "--data", data, "--out", tmp_path / "out", "--teacher", "resnet18", "--teacher-weights",
            weights, "--views", "2", "--topk", "2", "--shard-size", "4", "--device", "cpu", "--no-progress",
            "--launcher", "local"]
    if kind == "tars":  # without --unlabeled, tars without cls have nothing to label: said so
        line = _one_line_error(_run(*args))
        assert "no integer cls member" in line and "--unlabeled" in line
    result = _run(*args, "--unlabeled")
    assert result.exit_code == 0, result.output
    samples = list(iter_samples(sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))))
    assert len(samples) == 6 and {s["label"] for s in samples} == {-1}
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST_NAME).read_text())
    assert manifest["inputs"]["without_true_label"] == 6 and sum(e["unlabeled"] for e in manifest["shards"]) == 6
    report = json.loads(_run("inspect", tmp_path / "out", "--json").output)
    assert report["summary"]["with_true_label"] == 0 and report["summary"]["without_true_label"] == 6


def test_label_teacher_refuses_unlabelled_inputs_without_the_flag(tmp_path):
    weights = write_teacher(tmp_path / "t.pt", num_classes=10)
    line = _one_line_error(_run("label-teacher", "--data", "digits:unlabeled-10", "--out", tmp_path / "out",
                                "--teacher", "resnet18", "--teacher-weights", weights, "--no-progress"))
    assert "--unlabeled" in line
    assert not (tmp_path / "out").exists()


# -- students ---------------------------------------------------------------------------------


@pytest.mark.parametrize("replay", [ShardReplay, EncodedShardReplay])
def test_an_epoch_is_one_pass_over_every_set_and_unlabelled_samples_take_the_teachers_label(two_sets, replay):
    info = shard_sets_info(tuple(map(str, two_sets)))
    assert info["samples"] == 40 and info["unlabeled"] == 24 and len(info["urls"]) == 5
    for targets in ("hard", "soft"):
        data = replay(urls=info["urls"], num_classes=10, num_views=3, teacher_labels="views", img_size=16,
                           batch_size=8, steps=5, class_targets=targets, checksums=info["sha256"])
        rows = list(data)
        assert len(rows) == 40 and len({str(r.get("key", i)) for i, r in enumerate(rows)}) == 40
        for row in rows:
            label = row["label"]
            if targets == "hard":
                assert label.ndim == 0 and 0 <= int(label) < 10
            else:
                assert label.shape == (10,) and float(label.sum()) == pytest.approx(1.0, abs=1e-5)
        if targets == "soft":  # an unlabelled row is the teacher's distribution, not one-hot
            assert any(float(r["label"].max()) < 0.999 for r in rows)


def test_several_sets_train_and_config_records_them(two_sets, tmp_path):
    config = TrainConfig(shards=tuple(map(str, two_sets)), out=str(tmp_path / "run"), epochs=1, batch_size=8,
                         launcher="local", distillation="soft", progress=False, **TINY)
    result = train_student(config)
    assert result["epochs_done"] == 1 and read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["images"] == 40
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["shards"] == [str(p) for p in two_sets] and len(saved["manifest_sha256"]) == 64


def test_refusals_for_several_sets_are_one_line(two_sets, tmp_path):
    labelled, unlabelled = two_sets
    base = ["train-student", "--out", tmp_path / "run", *CLI_TINY]
    line = _one_line_error(_run(*base, "--shards", unlabelled, "--distillation", "none"))
    assert "without a true label" in line and "--distillation" in line
    other = _set(tmp_path / "other", 8, labelled=True, teacher="regnet_y_400mf")
    line = _one_line_error(_run(*base, "--shards", labelled, "--shards", other))
    assert "different teachers" in line
    line = _one_line_error(_run(*base, "--shards", labelled, "--shards", unlabelled, "--manifest",
                                labelled / schema.MANIFEST_NAME))
    assert "--manifest" in line
    line = _one_line_error(_run(*base, "--shards", labelled, "--shards", labelled))
    assert "more than once" in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainError, match="class count"):
        shard_sets_info((str(labelled), str(_set(tmp_path / "five", 8, labelled=True, classes=5))))


@pytest.mark.slow
def test_several_sets_resume_exactly_after_sigkill(tmp_path):
    labelled = _set(tmp_path / "labelled", 160, labelled=True)
    unlabelled = _set(tmp_path / "unlabelled", 240, labelled=False, first=1000)  # 50 steps an epoch in all
    args = ["train-student", "--shards", labelled, "--shards", unlabelled, *CLI_TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run([sys.executable, "-m", "deitpipe", *map(str, args), "--out", tmp_path / "full"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr
    cut_args = [sys.executable, "-m", "deitpipe", *map(str, args), "--out", str(tmp_path / "cut")]
    proc = subprocess.Popen(cut_args, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not checkpoint_files(tmp_path / "cut") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # after the first epoch's checkpoint
    proc.wait()
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) < 3
    rerun = subprocess.run(cut_args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [m["epoch"] for m in b] == [0, 1, 2]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-6, abs=1e-6)
    wa = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    wb = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_epoch_repeats_pass_over_a_small_set_again_with_other_views(tmp_path):
    from collections import Counter

    from deitpipe.student.data import steps_per_epoch

    labelled = _set(tmp_path / "few", 16, labelled=True)
    info = shard_sets_info((str(labelled),))
    steps = steps_per_epoch(info["samples"], batch_size=8, world_size=1, repeats=3)
    assert steps == 6
    data = ShardReplay(urls=info["urls"], num_classes=10, num_views=3, teacher_labels="views", img_size=16,
                       batch_size=8, steps=steps)
    seen = []
    original = data.view_of

    def record(sample, **kw):
        view = original(sample, **kw)
        seen.append((sample["key"], view[0]))
        return view

    data.view_of = record
    assert len(list(data)) == 48
    assert set(Counter(k for k, _ in seen).values()) == {3}  # every sample three times an epoch
    views = {k: [v for key, v in seen if key == k] for k, _ in seen}
    assert sum(len(set(v)) > 1 for v in views.values()) >= 8  # later passes draw other views

"""Relative paths mean the same in every process: each command run from another working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_digit_folder, write_teacher
from deitpipe.pipeline.cli import main
from deitpipe.pipeline.config import LabelConfig, TrainConfig, absolute_spec
from deitpipe.shards.format import schema


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_absolute_spec_resolves_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert absolute_spec("shards") == f"{here}/shards"
    assert absolute_spec("./a/../b/train-{000..009}.tar") == f"{here}/b/train-{{000..009}}.tar"
    assert absolute_spec("a.tar::b/c.tar") == f"{here}/a.tar::{here}/b/c.tar"
    assert absolute_spec("~/x") == os.path.expanduser("~/x")
    for spec in ("s3://bucket/shards/", "https://host/x-{0..1}.tar", "pipe:cat a.tar", "digits", "digits:val",
                 "/abs/path", None):
        assert absolute_spec(spec) == spec


def test_configs_resolve_every_path_they_hand_to_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = TrainConfig(shards="s", manifest="m.json", out="o", val="v", finetune="f.pt", online_teacher="resnet18",
                    teacher_weights="w.pt").resolved()
    assert (t.shards, t.manifest, t.out, t.val, t.finetune, t.teacher_weights) == tuple(
        str(tmp_path / n) for n in ("s", "m.json", "o", "v", "f.pt", "w.pt"))
    lab = LabelConfig(data="imgs", out="o", teacher_weights="w.pt").resolved()
    assert (lab.data, lab.out, lab.teacher_weights) == tuple(str(tmp_path / n) for n in ("imgs", "o", "w.pt"))
    assert LabelConfig(data="digits:train").resolved().data == "digits:train"


@pytest.mark.ray
@pytest.mark.slow
def test_commands_with_relative_paths_from_another_directory(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write_digit_folder(Path("imgs"))
    write_teacher(Path("teacher.pt"), 10)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    try:
        labelled = _run("label-teacher", "--data", "imgs", "--out", "shards", "--teacher", "resnet18",
                        "--teacher-weights", "teacher.pt", "--views", "2", "--topk", "2", "--shard-size", "4",
                        "--device", "cpu", "--no-progress")
        assert labelled.exit_code == 0, labelled.output
        assert "8 labelled" in labelled.output and (work / "shards" / schema.MANIFEST_NAME).is_file()
        # The student's workers read the shards and the held-out set by the paths the driver was given.
        trained = _run("train-student", "--shards", "shards", "--out", "run", "--val", "imgs",
                       "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1",
                       "--num-heads", "2", "--epochs", "1", "--batch-size", "4", "--num-workers", "1",
                       "--cpus-per-worker", "1", "--rand-augment", "-1", "--no-progress")
        assert trained.exit_code == 0, trained.output
        config = json.loads((work / "run" / "config.json").read_text())
        assert config["shards"] == str(work / "shards") and config["val"] == str(work / "imgs")
        metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 1 and "val_top1_avg" in metrics[0]
    finally:
        ray.shutdown()
    evaluated = _run("evaluate", "--checkpoint", "run", "--data", "imgs", "--json")
    assert evaluated.exit_code == 0 and json.loads(evaluated.output)["n"] == 8
    inspected = _run("inspect", "shards")
    assert inspected.exit_code == 0 and "OK" in inspected.output
    analyzed = _run("analyze", "--run", "run", "--data", "shards", "--out", "analysis", "--json")
    assert analyzed.exit_code == 0 and (work / "analysis" / "analysis.json").is_file()


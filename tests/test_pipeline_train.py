"""train-student on Ray Train: resume after a kill, outputs, manifest checks, evaluate."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import RecordingBar, write_shard_set
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.evaluate import evaluate_student
from deitpipe.pipeline.train import TrainError, shard_info, train_student
from deitpipe.shards.format import schema

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

TINY = dict(model="deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
            num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    yield
    ray.shutdown()


def _shards(tmp_path, n=40):
    out = tmp_path / "shards"
    write_shard_set(out, num_samples=n, shard_size=8, views=3, topk=3, num_classes=10)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def _config(shards, out, **kw):
    base = dict(shards=str(shards), out=str(out), epochs=3, batch_size=8, warmup_epochs=1, lr=5e-3,
                progress=False, num_workers=1, cpus_per_worker=1, **TINY)
    return TrainConfig(**{**base, **kw})


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(full, resumed):
    """Each epoch logged once, with the uninterrupted run's losses and final weights."""
    a, b = _metrics(full), _metrics(resumed)
    assert [m["epoch"] for m in b] == [0, 1, 2]
    for ma, mb in zip(a, b):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-4, abs=1e-5)
    wa = torch.load(full / "student.pt", weights_only=True)
    wb = torch.load(resumed / "student.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_killed_mid_epoch_and_resumed_matches_uninterrupted(tmp_path):
    shards = _shards(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_student(_config(shards, full))
    partial = train_student(_config(shards, cut, stop_after_steps=7))  # 5 steps per epoch: dies in epoch 1
    assert partial["epochs_done"] == 1
    train_student(_config(shards, cut))  # the same command again resumes from epoch 0's checkpoint
    _assert_same_run(full, cut)
    for run in (full, cut):  # 3 epochs reported, the latest 2 kept (--keep-checkpoints)
        assert len([p for p in (run / "ray").glob("checkpoint_*") if p.is_dir()]) == 2
    # The same core in this process, without Ray: the same losses and weights.
    local = tmp_path / "local"
    train_student(_config(shards, local, launcher="local"))
    _assert_same_run(full, local)
    assert [json.loads(line)["loss"] for line in (local / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([m["loss"] for m in _metrics(full)], rel=1e-5, abs=1e-5)
    # A Ray run resumes under the local launcher from Ray's checkpoint, and the other way round.
    mixed = tmp_path / "mixed"
    train_student(_config(shards, mixed, stop_after_steps=7))
    train_student(_config(shards, mixed, launcher="local"))
    _assert_same_run(full, mixed)


@pytest.mark.slow
def test_a_run_whose_processes_are_all_killed_resumes_to_the_same_result(tmp_path):
    """SIGKILL the whole train-student process group (driver, its Ray, the workers) mid-run, as
    when a node dies, then rerun the same command: the result equals an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    shards = _shards(tmp_path, n=400)  # 50 steps per epoch
    full, cut = tmp_path / "full", tmp_path / "cut"
    config = _config(shards, full)
    train_student(config)
    args = [sys.executable, "-m", "deitpipe.pipeline.cli", "train-student", "--shards", str(shards),
            "--out", str(cut), "--epochs", "3", "--batch-size", "8", "--warmup-epochs", "1", "--lr", "5e-3",
            "--cpus-per-worker", "1", "--no-progress", "--img-size", "16", "--patch-size", "4",
            "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
    env = {**os.environ, "DEITPIPE_OBJECT_STORE_BYTES": str(128 << 20)}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    log, deadline = cut / "metrics.jsonl", time.monotonic() + 240
    try:
        while not (log.exists() and log.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first epoch never finished"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = len(_metrics(cut))
    assert 1 <= done_at_kill < 3  # killed after a checkpoint, before the end

    train_student(replace(config, out=str(cut)))  # the same command again
    _assert_same_run(full, cut)


def test_outputs_load_in_timm_and_evaluate(tmp_path):
    timm = pytest.importorskip("timm")
    shards = _shards(tmp_path)
    out = tmp_path / "run"
    result = train_student(_config(shards, out, epochs=1, val=str(shards), distillation="soft", tau=2.0,
                                   launcher="local"))  # the outputs are the core's, whichever launcher
    assert result["last"]["val_n"] == 40 and 0 <= result["last"]["val_top1_avg"] <= 100
    config = json.loads((out / "config.json").read_text())
    assert config["distillation"] == "soft" and config["tau"] == 2.0
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=16,
                            patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            checkpoint_path=str(out / "student.pt"))
    state = torch.load(out / "student.pt", weights_only=True)
    assert torch.equal(ref.state_dict()["pos_embed"], state["pos_embed"])
    metrics = evaluate_student(checkpoint=str(out), data=str(shards))
    assert metrics["n"] == 40 and "agree_teacher_dist" in metrics
    assert metrics["top1_avg"] == pytest.approx(result["last"]["val_top1_avg"])
    from deitpipe.pipeline.analyze import analyze_student

    report = analyze_student(run=str(out), data=str(shards), out=str(tmp_path / "analysis"))
    assert len(report["token_similarity"]) == 2 + 1  # input + each of the 2 blocks
    assert all(-1 <= v <= 1 for v in report["token_similarity"])
    assert report["heads"]["agree_teacher_avg"] == pytest.approx(metrics["agree_teacher_avg"])
    assert report["curves"]["epoch"] == [0]
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["images"] == 40


def test_finetune_at_a_higher_resolution_starts_from_the_resampled_checkpoint(tmp_path):
    from deitpipe.student import resample_pos_embed

    shards = _shards(tmp_path)
    base, fine = tmp_path / "base", tmp_path / "fine"
    train_student(_config(shards, base, epochs=1, launcher="local"))
    # lr so small that the fine-tuned weights are the loaded ones: what was loaded is visible
    train_student(_config(shards, fine, epochs=1, img_size=24, finetune=str(base / "student.pt"), lr=1e-12,
                          warmup_epochs=0, launcher="local"))
    before = torch.load(base / "student.pt", weights_only=True)
    after = torch.load(fine / "student.pt", weights_only=True)
    assert after["pos_embed"].shape == (1, 2 + 6 * 6, 32)  # 24 px / patch 4: a 6x6 grid
    want = resample_pos_embed(before["pos_embed"], new_grid=(6, 6), num_prefix_tokens=2)
    torch.testing.assert_close(after["pos_embed"], want, rtol=0, atol=1e-6)
    for k in before:
        if k != "pos_embed":
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    assert json.loads((fine / "config.json").read_text())["img_size"] == 24


def test_a_different_run_into_the_same_out_refuses(tmp_path):
    shards = _shards(tmp_path, n=16)
    out = tmp_path / "run"
    train_student(_config(shards, out, epochs=1, launcher="local"))
    with pytest.raises(TrainError, match="--alpha.*--overwrite"):
        train_student(_config(shards, out, epochs=1, alpha=0.9, launcher="local"))


def test_manifest_checks_are_one_line(tmp_path):
    shards = _shards(tmp_path, n=8)
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    (shards / schema.MANIFEST_NAME).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(TrainError, match="has not finished"):
        shard_info(str(shards))
    (shards / schema.MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema"):
        shard_info(str(shards))
    (shards / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    info = shard_info(str(shards / "shard-{000000..000000}.tar"))
    assert info["samples"] == 8 and info["num_classes"] == 10
    with pytest.raises(TrainError, match="--teacher-labels views: the shards hold no views"):
        from deitpipe.pipeline.train import teacher_labels_mode

        teacher_labels_mode(replace(_config(shards, tmp_path / "x"), teacher_labels="views"), 0)


def test_two_ddp_workers_take_equal_steps_over_the_data(tmp_path):
    shards = _shards(tmp_path, n=40)
    out = tmp_path / "ddp"
    result = train_student(_config(shards, out, epochs=2, batch_size=4, num_workers=2))
    metrics = _metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert all(m["steps"] == 5 for m in metrics)  # 40 samples / (batch 4 x 2 ranks)
    assert result["last"]["step"] == 10


def test_the_driver_follows_rank_zeros_progress_from_a_resumed_step():
    import time

    from deitpipe.pipeline.launch import follow, progress_board

    board = progress_board()

    def fit():  # as rank 0 of a run resumed at step 10 posts it
        for step in (11, 15, 20):
            ray.get(board.post.remote(10, step, {"epoch": "2/2"}))
            time.sleep(0.1)

    bar = RecordingBar()
    follow(fit, board, bar, every_s=0.02)
    assert bar.began == 10 and bar.closed
    assert sum(n for n, _ in bar.updates) == 10  # steps 11..20 of this run, none counted twice
    assert bar.updates[-1][1] == {"epoch": "2/2"}


def test_a_failure_in_fit_reaches_the_caller():
    from deitpipe.pipeline.launch import follow, progress_board

    def fit():
        raise RuntimeError("worker died")

    bar = RecordingBar()
    with pytest.raises(RuntimeError, match="worker died"):
        follow(fit, progress_board(), bar, every_s=0.01)
    assert bar.closed

"""One training core under three launchers: this process, torchrun, Ray Train agree and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_shard_set
from deitpipe.pipeline.config import TrainConfig
from deitpipe.pipeline.train import train_student
from deitpipe.shards.format import schema
from deitpipe.student.runfiles import FileCheckpoints, checkpoint_files, latest_checkpoint

TINY = dict(model="deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
            num_heads=2)
CLI_TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
            "--epochs", "3", "--batch-size", "8", "--warmup-epochs", "1", "--lr", "5e-3", "--cpus-per-worker", "1",
            "--no-progress"]


def _shards(folder: Path, n: int = 40) -> Path:
    write_shard_set(folder, num_samples=n, shard_size=8, views=3, topk=3, num_classes=10)
    manifest = json.loads((folder / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def _config(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards), out=str(out), epochs=3, batch_size=8, warmup_epochs=1, lr=5e-3,
                progress=False, num_workers=1, cpus_per_worker=1, launcher="local", **TINY)
    return TrainConfig(**{**base, **kw})


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, *, tol: float = 1e-5) -> None:
    """Each epoch logged once, the same losses and the same final weights."""
    assert [json.loads(line)["epoch"] for line in (b / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert _losses(b) == pytest.approx(_losses(a), rel=tol, abs=tol)
    wa = torch.load(a / "student.pt", weights_only=True)
    wb = torch.load(b / "student.pt", weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_local_launcher_trains_and_resumes_to_the_uninterrupted_result(tmp_path):
    shards = _shards(tmp_path / "shards")
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_student(_config(shards, full))
    partial = train_student(_config(shards, cut, stop_after_steps=7))  # 5 steps an epoch: stops in epoch 1
    assert partial["epochs_done"] == 1 and [Path(p).name for p in checkpoint_files(cut)] == ["epoch-0000.pt"]
    train_student(_config(shards, cut))
    assert_same_run(full, cut, tol=1e-6)
    assert [Path(p).name for p in checkpoint_files(cut)] == ["epoch-0001.pt", "epoch-0002.pt"]  # --keep-checkpoints 2
    assert not (full / "ray").exists()


def test_checkpoints_are_plain_dicts_and_the_newest_is_found(tmp_path):
    save = FileCheckpoints(tmp_path, keep=2)
    for epoch in range(4):
        save({"epoch": epoch, "step": 10 * epoch, "model": {"w": torch.full((2,), float(epoch))}}, {})
    assert [Path(p).name for p in checkpoint_files(tmp_path)] == ["epoch-0002.pt", "epoch-0003.pt"]
    ray_dir = tmp_path / "ray" / "checkpoint_000009"  # Ray Train's folder of an older epoch
    ray_dir.mkdir(parents=True)
    torch.save({"epoch": 1, "step": 10}, ray_dir / "checkpoint.pt")
    state = latest_checkpoint(tmp_path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.full((2,), 3.0))
    torch.save({"epoch": 5, "step": 50}, ray_dir / "checkpoint.pt")  # now Ray's is newer: it wins
    assert latest_checkpoint(tmp_path)["epoch"] == 5
    # A checkpoint cut off by a lost node is passed over for the next newest, on either side.
    newer = tmp_path / "ray" / "checkpoint_000010"
    newer.mkdir()
    data = (ray_dir / "checkpoint.pt").read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        (newer / "checkpoint.pt").write_bytes(data[:cut])
        assert latest_checkpoint(tmp_path)["epoch"] == 5
    (ray_dir / "checkpoint.pt").write_bytes(data[:100])
    assert latest_checkpoint(tmp_path)["epoch"] == 3  # both of Ray's unreadable: the plain file's
    newest = checkpoint_files(tmp_path)[-1]
    Path(newest).write_bytes(Path(newest).read_bytes()[:50])
    assert latest_checkpoint(tmp_path)["epoch"] == 2


def _cli(*args, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "deitpipe", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_local_launcher_killed_by_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    shards = _shards(tmp_path / "shards", n=400)  # 50 steps an epoch
    train_student(_config(shards, tmp_path / "full"))
    args = ["train-student", "--launcher", "local", "--shards", shards, "--out", tmp_path / "cut", *CLI_TINY]
    proc = _cli(*args, cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 120
    while not checkpoint_files(tmp_path / "cut") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, after the first epoch's checkpoint
    proc.wait()
    assert len(_losses(tmp_path / "cut")) < 3
    rerun = _cli(*args, cwd=tmp_path)
    assert rerun.wait(timeout=300) == 0, rerun.stdout.read()
    assert_same_run(tmp_path / "full", tmp_path / "cut", tol=1e-6)


def _torchrun(nproc: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "deitpipe", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_one_process_matches_the_local_launcher_and_resumes(tmp_path):
    shards = _shards(tmp_path / "shards")
    train_student(_config(shards, tmp_path / "local"))
    args = ["train-student", "--launcher", "torchrun", "--shards", "shards", *CLI_TINY]
    run = _torchrun(1, *args, "--out", "torch", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same_run(tmp_path / "local", tmp_path / "torch")
    cut = _torchrun(1, *args, "--out", "cut", "--stop-after-steps", "7", cwd=tmp_path)
    assert cut.returncode == 0 and len(_losses(tmp_path / "cut")) == 1, cut.stdout + cut.stderr
    again = _torchrun(1, *args, "--out", "cut", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_run(tmp_path / "local", tmp_path / "cut")


@pytest.mark.slow
def test_torchrun_two_processes_train_with_ddp_and_resume(tmp_path):
    shards = _shards(tmp_path / "shards")
    args = ["train-student", "--launcher", "torchrun", "--shards", "shards", *CLI_TINY]
    full = _torchrun(2, *args, "--out", "full", cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[-1]["step"] == 6  # 40 // (8 * 2) a rank
    cut = _torchrun(2, *args, "--out", "cut", "--stop-after-steps", "3", cwd=tmp_path)
    assert cut.returncode == 0, cut.stdout + cut.stderr
    again = _torchrun(2, *args, "--out", "cut", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_torchrun_launcher_outside_torchrun_is_one_line(tmp_path, monkeypatch):
    from deitpipe.pipeline.train import TrainError

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(TrainError, match="torchrun --nproc-per-node"):
        train_student(_config(_shards(tmp_path / "shards"), tmp_path / "out", launcher="torchrun"))


@pytest.mark.slow
def test_torchrun_ranks_stop_together_when_rank_zero_cannot_take_the_run(tmp_path):
    from deitpipe.pipeline.outdir import locked

    _shards(tmp_path / "shards")
    args = ["train-student", "--launcher", "torchrun", "--shards", "shards", "--out", "run", *CLI_TINY]
    with locked(tmp_path / "run", command="another run"):
        result = _torchrun(2, *args, cwd=tmp_path)  # would hang if rank 1 waited for rank 0 forever
    assert result.returncode != 0
    assert "in use by another run" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_gpu_loader_path_trains_and_resumes_on_the_cpu_device(tmp_path):
    # --loader gpu: workers read bytes, the training process decodes, cuts and augments the batch.
    shards = _shards(tmp_path / "shards")
    kw = dict(loader="gpu", rand_augment=9, random_erasing=0.25)
    full = train_student(_config(shards, tmp_path / "full", **kw))
    assert full["epochs_done"] == 3
    train_student(_config(shards, tmp_path / "cut", stop_after_steps=7, **kw))
    train_student(_config(shards, tmp_path / "cut", **kw))
    assert_same_run(tmp_path / "full", tmp_path / "cut", tol=1e-6)
    cpu = train_student(_config(shards, tmp_path / "cpu", rand_augment=9, random_erasing=0.25))
    assert cpu["last"]["loss"] != full["last"]["loss"]  # another path, other draws: the option reached the loader

"""Both stages, inspect and evaluate with object storage in and out: a real S3 API (moto's server)
on loopback, reached through the standard AWS environment by the driver and every Ray worker."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import write_digit_folder, write_shard_set
from deitpipe.pipeline.cli import main
from deitpipe.pipeline.config import LabelConfig, TrainConfig
from deitpipe.pipeline.label import label_teacher
from deitpipe.pipeline.outdir import OutputError
from deitpipe.pipeline.train import train_student
from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.reader import iter_samples
from test_pipeline_label import _teacher
from test_shards_storage import keys_under

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = dict(model="deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def ray_with_s3_env(s3_endpoint):
    """The AWS environment is set before Ray starts, so every worker process inherits it."""
    env = {"AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _input_tars(tmp_path: Path, n: int = 12) -> list[Path]:
    folder = write_digit_folder(tmp_path / "digits", n=n)
    files = sorted(folder.glob("*/*.png"))
    tars = []
    for t in range(2):
        tars.append(tmp_path / f"in-{t:06d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for p in files[t::2]:
                for ext, data in (("png", p.read_bytes()), ("cls", p.parent.name.encode())):
                    info = tarfile.TarInfo(f"{p.stem}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return tars


def _label_config(data, out, weights, **kw) -> LabelConfig:
    return LabelConfig(data=str(data), out=str(out), teacher="resnet18", teacher_weights=str(weights), views=2,
                       topk=2, shard_size=3, batch_size=16, progress=False, device="cpu", **kw)


def _same_samples(a, b):
    assert [s["key"] for s in a] == [s["key"] for s in b] and a
    for x, y in zip(a, b):
        assert x["image"] == y["image"] and x["label"] == y["label"]
        for k in ("box", "flip", "hard", "topk", "prob"):
            assert (x[k] == y[k]).all(), k


def test_label_teacher_reads_and_writes_a_bucket_and_resumes(tmp_path, s3_bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tars = _input_tars(tmp_path)
    for t in tars:
        storage.upload(t, f"{s3_bucket}/in/{t.name}")
    weights = _teacher(tmp_path, 10)
    label_teacher(_label_config(tmp_path / "in-{000000..000001}.tar", tmp_path / "local", weights))
    remote = f"{s3_bucket}/shards/"
    data = f"{s3_bucket}/in/in-{{000000..000001}}.tar"
    first = label_teacher(_label_config(data, remote, weights))
    assert first["run"]["shards_written"] == 4 and first["inputs"]["labelled"] == 12
    _same_samples(list(iter_samples(remote)), list(iter_samples(str(tmp_path / "local"))))
    names = [e["name"] for e in first["shards"]]
    assert keys_under(s3_bucket) == sorted([f"in/{t.name}" for t in tars] + [f"shards/{n}" for n in names]
                                           + [f"shards/{schema.MANIFEST_NAME}"])
    assert not Path("s3:").exists()  # nothing written to a local folder named after the scheme
    again = label_teacher(_label_config(data, remote, weights))  # complete shards verified and kept
    assert again["run"]["shards_written"] == 0 and again["run"]["shards_skipped"] == 4

    # A run killed while uploading its third shard: its temporary key is left, no final key.
    import deitpipe.pipeline.label as label_module

    real_upload = storage.upload

    def dying_upload(source, uri):
        if uri.endswith(names[2]):
            fs, path = storage.filesystem(uri)
            with fs.open_output_stream(path.rsplit("/", 1)[0] + f"/.{names[2]}.tmp-4242-0") as out:
                out.write(b"part of a shard")
            raise KeyboardInterrupt
        real_upload(source, uri)

    cut = f"{s3_bucket}/cut"
    monkeypatch.setattr(label_module.storage, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        label_teacher(_label_config(data, cut, weights))
    monkeypatch.setattr(label_module.storage, "upload", real_upload)
    assert f"cut/{names[2]}" not in keys_under(s3_bucket) and f"cut/.{names[2]}.tmp-4242-0" in keys_under(s3_bucket)
    resumed = label_teacher(_label_config(data, cut, weights))
    assert resumed["run"]["shards_written"] + resumed["run"]["shards_skipped"] == 4
    assert resumed["run"]["shards_written"] >= 1
    assert [k for k in keys_under(s3_bucket) if k.startswith("cut/")] == sorted(
        [f"cut/{n}" for n in names] + [f"cut/{schema.MANIFEST_NAME}"])  # the temporary key is gone
    for n in names:  # byte for byte the uninterrupted run's shards
        assert storage.read_bytes(f"{cut}/{n}") == storage.read_bytes(f"{remote}{n}"), n

    result = CliRunner().invoke(main, ["inspect", remote])
    assert result.exit_code == 0, result.output
    assert "OK: every shard verifies" in result.output and "12 samples" in result.output


def test_label_teacher_refuses_a_foreign_prefix_and_names_a_missing_bucket(tmp_path, s3_bucket):
    tars = _input_tars(tmp_path, n=4)
    weights = _teacher(tmp_path, 10)
    storage.write_bytes(f"{s3_bucket}/theirs/backup.tar", b"not ours")
    with pytest.raises(OutputError, match="is not empty and holds no label-teacher manifest.json"):
        label_teacher(_label_config(tars[0], f"{s3_bucket}/theirs", weights, overwrite=True))
    assert keys_under(s3_bucket) == ["theirs/backup.tar"]
    result = CliRunner().invoke(main, ["label-teacher", "--data", str(tars[0]), "--out", f"{s3_bucket}-gone/shards",
                                       "--teacher", "resnet18", "--teacher-weights", str(weights), "--no-progress"])
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {s3_bucket}-gone/shards/") and line.endswith(": no such bucket"), line


def _shards_in_bucket(tmp_path: Path, prefix: str) -> Path:
    local = tmp_path / "shards"
    write_shard_set(local, num_samples=40, shard_size=8, views=3, topk=3, num_classes=10)
    manifest = json.loads((local / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (local / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    for p in sorted(local.iterdir()):
        storage.upload(p, storage.join(prefix, p.name))
    return local


def _train_config(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards), out=str(out), epochs=3, batch_size=8, warmup_epochs=1, lr=5e-3, progress=False,
                num_workers=1, cpus_per_worker=1, launcher="local", **TINY)
    return TrainConfig(**{**base, **kw})


def _weights(uri) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def _assert_same_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_train_student_writes_and_resumes_in_a_bucket(tmp_path, s3_bucket, launcher):
    shards = f"{s3_bucket}/shards/"
    local_shards = _shards_in_bucket(tmp_path, shards)
    full = tmp_path / "full"
    train_student(_train_config(local_shards, full))
    run = f"{s3_bucket}/runs/deit-t"
    storage.write_bytes(f"{run}/notes.txt", b"the user's")  # a foreign file, planted before the first run
    with pytest.raises(OutputError, match="holds no train-student config.json"):
        train_student(_train_config(shards, run, launcher=launcher))
    storage.remove(f"{run}/notes.txt")
    cut = train_student(_train_config(shards, run, launcher=launcher, stop_after_steps=7))  # killed in epoch 1
    assert cut["epochs_done"] == 1
    done = train_student(_train_config(shards, run, launcher=launcher))  # the same command resumes
    assert done["epochs_done"] == 3 and done["student"] == f"{run}/student.pt"
    _assert_same_weights(torch.load(full / "student.pt", weights_only=True), _weights(f"{run}/student.pt"))
    metrics = [json.loads(line) for line in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    keys = [k.split("/", 2)[2] for k in keys_under(s3_bucket) if k.startswith("runs/")]
    assert {"config.json", "metrics.jsonl", "student.pt"} <= set(keys)
    assert not [k for k in keys if ".tmp-" in k]
    if launcher == "local":
        assert [k for k in keys if k.startswith("checkpoints/")] == ["checkpoints/epoch-0001.pt",
                                                                     "checkpoints/epoch-0002.pt"]
    else:
        folders = {k.split("/")[1] for k in keys if k.startswith("ray/checkpoint_") and k.endswith("/checkpoint.pt")}
        assert len(folders) == 2  # --keep-checkpoints

    # evaluate reads the run from the bucket as from disk
    (tmp_path / "copy").mkdir()
    for name in ("student.pt", "config.json"):
        (tmp_path / "copy" / name).write_bytes(storage.read_bytes(f"{run}/{name}"))
    val = write_digit_folder(tmp_path / "val", n=6)
    out = [CliRunner().invoke(main, ["evaluate", "--checkpoint", c, "--data", str(val), "--json"])
           for c in (run, str(tmp_path / "copy"))]
    assert [r.exit_code for r in out] == [0, 0], out[0].output
    a, b = (json.loads(r.output[r.output.index("{"):]) for r in out)
    assert a["top1_avg"] == b["top1_avg"] and a["n"] == b["n"] == 6

    if launcher == "local":  # analyze reads the run and writes its report beside it, in the bucket
        result = CliRunner().invoke(main, ["analyze", "--run", run, "--data", str(val), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(storage.read_bytes(f"{run}/analysis.json"))
        assert report["curves"]["epoch"] == [0, 1, 2]
        assert all(p.startswith(f"{run}/") and storage.is_file(p) for p in report["plots"])  # with matplotlib

    # --overwrite replaces the run's own objects only
    storage.write_bytes(f"{run}/notes.txt", b"the user's")
    train_student(replace(_train_config(shards, run, launcher=launcher, epochs=1), overwrite=True))
    assert storage.read_bytes(f"{run}/notes.txt") == b"the user's"
    metrics = storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()
    assert len(metrics) == 1

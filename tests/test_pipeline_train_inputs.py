"""train-student's inputs: shards by directory, local pattern, pipe: command or URL, and their
manifest; all without Ray."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_shard_set
from deitpipe.pipeline.train import TrainError, _manifest_beside, shard_info
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import ManifestError, read_manifest
from deitpipe.shards.format.reader import shard_name
from deitpipe.student.data import Augment, ShardReplay


@pytest.fixture()
def shards(tmp_path):
    out = tmp_path / "shards"
    write_shard_set(out, num_samples=10, shard_size=4, views=2, topk=3, num_classes=10)
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    manifest.update(complete=True, teacher={"name": "resnet18"}, class_names=[str(i) for i in range(10)])
    (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(("url", "name"), [
    ("/data/shards/shard-000001.tar", "shard-000001.tar"),
    ("s3://bucket/shards/shard-000001.tar", "shard-000001.tar"),
    ("pipe:cat /data/shards/shard-000001.tar", "shard-000001.tar"),
    ("pipe:aws s3 cp s3://bucket/shard-000002.tar -", "shard-000002.tar"),
    ("pipe:curl -s https://host/x/shard-000003.tar | cat", "shard-000003.tar"),
])
def test_shard_name_is_the_same_however_the_shard_is_read(url, name):
    assert shard_name(url) == name


def test_a_pipe_pattern_with_its_manifest_reads_like_the_directory(shards):
    local = shard_info(str(shards))
    piped = shard_info(f"pipe:cat {shards}/shard-{{000000..000002}}.tar", manifest=f"pipe:cat {shards}/manifest.json")
    assert piped["samples"] == local["samples"] == 10
    assert piped["urls"] == [f"pipe:cat {u}" for u in local["urls"]]
    assert piped["manifest"] == f"pipe:cat {shards}/manifest.json" and local["manifest"] == str(shards)
    same = ("num_classes", "class_names", "views", "teacher", "samples")
    assert {k: piped[k] for k in same} == {k: local[k] for k in same}

    def examples(urls):
        ds = ShardReplay(urls=urls, num_classes=10, num_views=2, teacher_labels="views", img_size=16,
                         batch_size=2, steps=5, augment=Augment(rand_augment=None, random_erasing=0.0))
        ds.set_epoch(2)
        return list(ds)

    a, b = examples(local["urls"]), examples(piped["urls"])
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):  # same order, views and pixels, since the order is keyed by shard name
        torch.testing.assert_close(x["image"], y["image"])
        assert int(x["teacher_hard"]) == int(y["teacher_hard"])


def test_a_pipe_pattern_without_a_manifest_says_what_to_pass(shards):
    with pytest.raises(TrainError, match="pass --manifest") as err:
        shard_info(f"pipe:cat {shards}/shard-{{000000..000002}}.tar")
    assert "\n" not in str(err.value)


def test_the_manifest_of_a_url_pattern_is_beside_it(shards):
    assert _manifest_beside("s3://bucket/run/shard-{000000..000009}.tar") == "s3://bucket/run/manifest.json"
    assert _manifest_beside("https://host/a/b/shard-000000.tar") == "https://host/a/b/manifest.json"
    assert _manifest_beside(f"{shards}/shard-{{000000..000002}}.tar") == str(shards)
    assert _manifest_beside(str(shards)) == str(shards)


def test_a_shard_the_manifest_does_not_list_is_refused(shards, tmp_path):
    (shards / "shard-000003.tar").write_bytes((shards / "shard-000000.tar").read_bytes())
    with pytest.raises(TrainError, match="shard-000003.tar is not listed"):
        shard_info(f"{shards}/shard-{{000000..000003}}.tar", manifest=str(shards / schema.MANIFEST_NAME))


def test_an_unreadable_remote_manifest_is_one_line(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the manifest") as err:
        read_manifest(f"pipe:cat {tmp_path}/missing.json")
    assert "\n" not in str(err.value)


def test_resuming_a_student_whose_head_does_not_fit_the_shards_is_one_line(shards, tmp_path):
    from deitpipe.pipeline.config import TrainConfig
    from deitpipe.pipeline.train import _prepare_out

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"head.weight": torch.zeros(100, 8), "head.bias": torch.zeros(100)}, out / "student.pt")
    config = TrainConfig(shards=str(shards), out=str(out))
    with pytest.raises(TrainError, match="100-class head but .* lists 10 classes; pass --overwrite") as err:
        _prepare_out(out, config, num_classes=10, manifest=str(shards))
    assert "\n" not in str(err.value)
    _prepare_out(out, config, num_classes=100, manifest=str(shards))  # a fitting head resumes
    assert (out / "config.json").exists()

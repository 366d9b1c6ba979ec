"""The manifest's types are checked when it is read: a damaged one fails there, in one line."""

from __future__ import annotations

import json

import pytest

from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import ManifestError, read_manifest, write_manifest
from deitpipe.shards.format.verify import verify_shards


def _entry(**kw):
    return {"name": "shard-000000.tar", "samples": 3, "bytes": 10240, "sha256": "ab" * 32, "first_index": 0,
            "candidates": 3, "skipped": [], **kw}


def _manifest(**kw):
    """A complete manifest as label-teacher writes it (shard files are not needed to read it)."""
    return {"schema_version": schema.SCHEMA_VERSION, "created": "2024-01-01T00:00:00+00:00", "complete": True,
            "config": {"seed": 0}, "teacher": {"name": "resnet18"}, "num_classes": 10,
            "class_names": [str(i) for i in range(10)], "views": 2, "topk": 3, "full_softmax": False, "seed": 0,
            "shards": [_entry()], "inputs": {"found": 3, "labelled": 3, "skipped": [], "ignored": 0}, **kw}


def test_manifests_label_teacher_writes_are_valid(tmp_path):
    write_manifest(tmp_path, _manifest())
    assert read_manifest(tmp_path)["shards"][0]["samples"] == 3
    write_manifest(tmp_path, _manifest(schema_version=1))  # a shard set written in schema version 1
    assert read_manifest(tmp_path)["schema_version"] == 1
    in_progress = {k: v for k, v in _manifest(complete=False, shards=[]).items() if k != "inputs"}
    write_manifest(tmp_path, in_progress)
    assert read_manifest(tmp_path)["shards"] == []
    write_manifest(tmp_path, {"shards": [{"name": "shard-000000.tar", "samples": 0}]})  # optional keys absent
    assert read_manifest(tmp_path)["shards"][0]["samples"] == 0


@pytest.mark.parametrize("text, key, message", [
    ("{not json", None, "manifest is not valid JSON"),
    (json.dumps([_manifest()]), None, "manifest must be a JSON object, got list"),
    (_manifest(shards={"shard-000000.tar": 3}), "shards", "must be a list of shard entries"),
    (_manifest(shards=["shard-000000.tar"]), "shards[0]", "must be an object, got 'shard-000000.tar'"),
    (_manifest(shards=[{"samples": 3}]), "shards[0].name", "is missing"),
    (_manifest(shards=[_entry(samples="3")]), "shards[0].samples", "must be an integer >= 0, got '3'"),
    (_manifest(shards=[_entry(), _entry(name="../../x.tar")]), "shards[1].name", "must be a file name"),
    (_manifest(shards=[_entry(first_index=-1)]), "shards[0].first_index", "must be an integer >= 0, got -1"),
    (_manifest(num_classes="10"), "num_classes", "must be an integer >= 1, got '10'"),
    (_manifest(num_classes=True), "num_classes", "must be an integer >= 1, got True"),
    (_manifest(views=-1), "views", "must be an integer >= 0, got -1"),
    (_manifest(class_names="cat,dog"), "class_names", "must be a list of strings, got 'cat,dog'"),
    (_manifest(class_names=["cat", 1]), "class_names", "must be a list of strings, got ['cat', 1]"),
    (_manifest(complete="yes"), "complete", "must be true or false, got 'yes'"),
    (_manifest(teacher="resnet18"), "teacher", "must be an object, got 'resnet18'"),
    (_manifest(schema_version=4), None, "shard schema_version 4, this deitpipe reads 1, 2 and 3; relabel"),
    (_manifest(schema_version=True), None, "shard schema_version True, this deitpipe reads 1, 2 and 3"),
])
def test_wrong_types_are_one_line_naming_file_and_key(tmp_path, text, key, message):
    path = tmp_path / schema.MANIFEST_NAME
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    line = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in line
    assert line.startswith(f"{path}: ") and message in line
    if key is not None:
        assert f"{path}: {key!r} {message}" in line
    assert verify_shards(tmp_path) == [line]  # reported as a problem, not a traceback


def test_the_documented_message(tmp_path):
    path = tmp_path / "shards-out" / schema.MANIFEST_NAME
    path.parent.mkdir()
    path.write_text(json.dumps(_manifest(num_classes="10")))
    with pytest.raises(ValueError) as err:
        read_manifest(path)
    assert str(err.value) == f"{path}: 'num_classes' must be an integer >= 1, got '10'"

"""Schema version 2: a sample's per-view arrays in one ``views.npy`` member, read alongside version 1."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import recfunctions

from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import ManifestError, read_manifest, write_manifest
from deitpipe.shards.format.plan import plan_shards
from deitpipe.shards.format.reader import (
    decode_sample,
    expand_urls,
    iter_samples,
    iter_tar_samples,
    read_shard,
    sample_schema_version,
    teacher_distribution,
)
from deitpipe.shards.format.verify import verify_shards
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample

FIELDS = schema.VIEW_FIELDS + (schema.SOFTMAX_FIELD,)


def wide_sample(index: int, *, views: int = 2, topk: int = 5, num_classes: int = 70_000) -> dict:
    """Encoder arguments of a sample with more than 65,536 classes (int32 indices) and a full softmax."""
    rng = np.random.default_rng(index)
    probs = rng.dirichlet(np.ones(num_classes), size=views + 1).astype(np.float32)
    probs[:, num_classes - 1 - index] += 1.0  # a class index above 65,535 comes first
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :topk].astype(np.int32)
    top_p = np.take_along_axis(probs, top, 1)
    return dict(
        key=schema.sample_key(index), image_bytes=b"\x89PNG\r\n\x1a\n" + bytes(index), image_ext="png",
        label=index, meta={"path": f"wide/{index}.png", "height": 8, "width": 8},
        views={"box": np.tile(np.int32([0, 0, 8, 8]), (views + 1, 1)), "flip": np.zeros(views + 1, np.uint8),
               "hard": top[:, 0], "topk": top, "prob": top_p.astype(np.float16),
               "rest": (1 - top_p.sum(1)).astype(np.float16), "softmax": probs.astype(np.float16)},
        num_classes=num_classes)


def write_set(out: Path, samples: list[dict], versions: list[int], *, manifest_version: int = 2) -> None:
    """A shard set of 3-sample shards, shard ``i`` written in ``versions[i]``, with its manifest."""
    entries = []
    for s, (part, version) in enumerate(zip(plan_shards(len(samples), 3), versions, strict=True)):
        with ShardFileWriter(out, schema.shard_name(s)) as w:
            for i in part:
                w.write(encode_sample(**samples[i], schema_version=version))
        entries.append({**w.record(), "first_index": part.start})
    write_manifest(out, {"schema_version": manifest_version, "num_classes": 10, "views": 2, "topk": 3,
                         "full_softmax": False, "shards": entries, "complete": True,
                         "teacher": {"name": "resnet18"}, "class_names": [str(i) for i in range(10)],
                         "inputs": {"found": len(samples), "labelled": len(samples), "skipped": [], "ignored": 0}})


def member_bytes(path: Path) -> dict[str, int]:
    """On-disk bytes per member suffix of a tar: a 512-byte header plus the data padded to 512."""
    out: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            suffix = m.name.split(".", 1)[1]
            out[suffix] = out.get(suffix, 0) + 512 + -(-m.size // 512) * 512
    return out


def assert_same_arrays(got: dict, want: dict) -> None:
    for name, arr in want.items():
        assert got[name].dtype == np.asarray(arr).dtype, name
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
        assert got[name].flags.c_contiguous and got[name].flags.writeable and got[name].flags.owndata, name


def test_round_trip_three_samples_with_softmax_and_int32_classes(tmp_path, sample_maker):
    samples = [sample_maker(0), sample_maker(1, softmax=True), wide_sample(2)]
    with ShardFileWriter(tmp_path, "shard-000000.tar") as w:
        for s in samples:
            w.write(encode_sample(**s))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = [m.name for m in tar.getmembers()]
    assert names == [f"{s['key']}.{m}" for s in samples for m in ("png", "cls", "json", schema.VIEWS)]
    got = list(iter_samples(str(tmp_path / "shard-000000.tar")))
    assert [g["key"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        assert g["image"] == s["image_bytes"] and g["label"] == s["label"] and g["meta"] == s["meta"]
        assert_same_arrays(g, s["views"])
        assert set(g) - {"key", "url", "image", "image_ext", "label", "meta"} == set(s["views"])
    assert got[2]["topk"].dtype == np.int32 and got[2]["topk"].max() > 65535
    assert got[0]["hard"].dtype == np.uint16


def test_views_member_is_plain_npy_that_numpy_loads_without_pickle(sample_maker):
    for s, (c, k, full) in ((sample_maker(0), (10, 3, False)), (sample_maker(1, softmax=True), (10, 3, True)),
                            (wide_sample(2), (70_000, 5, True))):
        rows = np.load(io.BytesIO(encode_sample(**s)[schema.VIEWS]), allow_pickle=False)
        assert rows.dtype == schema.views_dtype(c, k, full) and rows.shape == (3,)
        assert rows.dtype.names == FIELDS[:len(rows.dtype.names)]
        np.testing.assert_array_equal(rows["topk"], s["views"]["topk"])
    assert schema.views_dtype(1000, 10, False).itemsize == schema.bytes_per_view(1000, 10, False) == 61
    assert schema.bytes_per_view(1000, 10, True) == 61 + 2000
    assert schema.views_dtype(70_000, 10, False)["hard"] == np.dtype("<i4")


@pytest.mark.parametrize("make", ["narrow", "softmax", "wide"])
def test_version_1_and_2_decode_to_the_same_dict(sample_maker, make):
    s = {"narrow": sample_maker(0), "softmax": sample_maker(1, softmax=True), "wide": wide_sample(2)}[make]
    v1 = {**encode_sample(**s, schema_version=1), "__url__": "u"}
    v2 = {**encode_sample(**s), "__url__": "u"}
    assert sample_schema_version(v1) == 1 and sample_schema_version(v2) == 2
    assert schema.VIEWS in v2 and not any(m in v2 for m in schema.V1_VIEW_MEMBERS)
    a, b = decode_sample(v1), decode_sample(v2)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name
    c = s.get("num_classes", 10)
    for view in range(3):
        np.testing.assert_array_equal(teacher_distribution(a, view, c), teacher_distribution(b, view, c))


def test_version_1_shard_sets_are_still_read(tmp_path, sample_maker):
    samples = [sample_maker(i, softmax=(i == 1)) for i in range(5)]
    write_set(tmp_path, samples, [1, 1], manifest_version=1)
    assert read_manifest(tmp_path)["schema_version"] == 1
    assert verify_shards(tmp_path, deep=True) == []
    got = list(iter_samples(str(tmp_path)))
    assert all(sample_schema_version(r) == 1 for r in iter_tar_samples(str(tmp_path)))
    for g, s in zip(got, samples, strict=True):
        assert_same_arrays(g, s["views"])


def test_mixed_shard_set_is_read_by_one_reader(tmp_path, sample_maker):
    """A version 1 set resumed by a version 2 writer: old shards kept, new ones in version 2."""
    samples = [sample_maker(i) for i in range(5)]
    write_set(tmp_path, samples, [1, 2])
    assert verify_shards(tmp_path, deep=True) == []
    urls = expand_urls(str(tmp_path))
    assert [sample_schema_version(read_shard(u)[0]) for u in urls] == [1, 2]
    for url in urls:
        assert read_shard(url) == list(iter_tar_samples(url))
    got = [decode_sample(r) for u in urls for r in read_shard(u)]
    for g, s in zip(got, samples, strict=True):
        assert_same_arrays(g, s["views"])


def test_mixed_shard_set_replays_as_a_single_version_one(tmp_path, sample_maker):
    from deitpipe.student.data import Augment, ShardReplay

    samples = [sample_maker(i) for i in range(6)]
    batches = {}
    for name, versions in (("v2", [2, 2]), ("mixed", [1, 2])):
        write_set(tmp_path / name, samples, versions)
        data = ShardReplay(urls=expand_urls(str(tmp_path / name)), num_classes=10, num_views=2,
                           teacher_labels="views", img_size=16, batch_size=2, steps=3,
                           augment=Augment(rand_augment=None, random_erasing=0))  # no unseeded draws
        batches[name] = list(data)
    assert len(batches["v2"]) == len(batches["mixed"]) == 6
    for a, b in zip(batches["v2"], batches["mixed"]):
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_teacher_part_is_one_member_of_at_most_1600_bytes(tmp_path, sample_maker):
    """Top-10 of 1000 classes, 8 views: the per-view arrays cost one header plus padding."""
    s = sample_maker(0, views=8, topk=10, num_classes=1000)
    sizes = {}
    for version in (1, 2):
        with ShardFileWriter(tmp_path, f"v{version}.tar") as w:
            w.write(encode_sample(**s, num_classes=1000, schema_version=version))
        sizes[version] = member_bytes(tmp_path / f"v{version}.tar")
    v2 = {m: b for m, b in sizes[2].items() if m not in ("png", "cls", "json")}
    v1 = {m: b for m, b in sizes[1].items() if m not in ("png", "cls", "json")}
    assert list(v2) == [schema.VIEWS] and v2[schema.VIEWS] <= 1600
    assert v2[schema.VIEWS] == 512 + 1024  # 9 rows x 61 B + the npy header fit two 512-byte blocks
    assert sorted(v1) == sorted(schema.V1_VIEW_MEMBERS) and sum(v1.values()) == 6 * 1024


def test_pickled_views_member_is_refused(sample_maker):
    raw = {**encode_sample(**sample_maker(0)), "__url__": "u"}
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, dtype=[("box", object), ("flip", "u1")]), allow_pickle=True)
    raw[schema.VIEWS] = buf.getvalue()
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_sample(raw)


def test_damaged_views_members_are_one_line_value_errors(sample_maker):
    good = {**encode_sample(**sample_maker(0)), "__url__": "shard.tar"}
    truncated = {**good, schema.VIEWS: good[schema.VIEWS][:-10]}
    with pytest.raises(ValueError, match="declares .* bytes but holds"):
        decode_sample(truncated)
    rows = np.load(io.BytesIO(good[schema.VIEWS]))
    no_rest = recfunctions.drop_fields(rows, "rest", usemask=False)
    for bad in (no_rest, np.zeros((3, 4), np.float32), rows.reshape(1, 3)):
        buf = io.BytesIO()
        np.save(buf, bad)
        with pytest.raises(ValueError, match=r"^shard.tar: sample s000000000: views.npy must be a 1-D structured"):
            decode_sample({**good, schema.VIEWS: buf.getvalue()})
    v1 = encode_sample(**sample_maker(0), schema_version=1)
    with pytest.raises(ValueError, match="holds both views.npy"):
        decode_sample({**good, schema.PROB: v1[schema.PROB]})
    with pytest.raises(ValueError, match=r"lacks members \['views.npy'\]"):
        decode_sample({k: v for k, v in good.items() if k != schema.VIEWS})
    with pytest.raises(ValueError, match=r"lacks members \['rest.npy'\]"):
        decode_sample({k: v for k, v in {**v1, "__url__": "u"}.items() if k != schema.REST})


def test_duplicate_views_member_is_refused(tmp_path, sample_maker):
    sample = encode_sample(**sample_maker(0))
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member in ("png", "cls", "json", schema.VIEWS, schema.VIEWS):
            info = tarfile.TarInfo(f"{sample['__key__']}.{member}")
            info.size = len(sample[member])
            tar.addfile(info, io.BytesIO(sample[member]))
    with pytest.raises(ValueError, match="duplicate"):
        read_shard(str(path))


def test_manifest_versions(tmp_path):
    for version in (1, 2, 3):
        write_manifest(tmp_path, {"schema_version": version, "shards": []})
        assert read_manifest(tmp_path)["schema_version"] == version
    write_manifest(tmp_path, {"shards": []})
    assert read_manifest(tmp_path)["schema_version"] == schema.SCHEMA_VERSION == 2
    for bad in (4, 0, True, 2.0, "2", None):
        (tmp_path / schema.MANIFEST_NAME).write_text(json.dumps({"schema_version": bad, "shards": []}))
        with pytest.raises(ManifestError, match=r"schema_version .*, this deitpipe reads 1, 2 and 3; relabel"):
            read_manifest(tmp_path)
    with pytest.raises(ValueError, match="schema_version 4"):
        write_manifest(tmp_path, {"schema_version": 4, "shards": []})


@pytest.mark.parametrize("versions, manifest_version", [([2, 2], 2), ([1, 1], 1), ([1, 2], 2)])
def test_inspect_shows_the_schema_version(tmp_path, sample_maker, versions, manifest_version):
    from deitpipe.pipeline.inspect import inspect_shards

    write_set(tmp_path, [sample_maker(i) for i in range(5)], versions, manifest_version=manifest_version)
    report = inspect_shards(tmp_path, deep=True)
    assert report["ok"], report["text"]
    assert report["summary"]["schema_version"] == manifest_version
    assert report["sample"]["schema_version"] == versions[0]
    assert f"schema version {manifest_version}, 2 shards" in report["text"]
    assert f"schema version {versions[0]}): label 0" in report["text"]


@pytest.mark.parametrize("versions", [[2, 2], [1, 1], [1, 2]])
def test_shards_md_example_reads_both_versions(tmp_path, sample_maker, capsys, versions):
    samples = [sample_maker(i) for i in range(5)]
    write_set(tmp_path, samples, versions)
    doc = (Path(__file__).parents[1] / "SHARDS.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    exec(compile(code.replace("out/shard-", f"{tmp_path}/shard-"), "SHARDS.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [s["key"] for s in samples]
    for line, s in zip(lines, samples):
        assert line.split()[-2] == str(s["views"]["hard"][1])  # hard label of view 1

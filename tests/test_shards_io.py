"""Writer, reader and manifest: round trips, atomicity, reproducibility, verification."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import ManifestError, read_manifest, write_manifest
from deitpipe.shards.format.reader import (
    decode_sample,
    expand_urls,
    iter_samples,
    iter_tar_samples,
    teacher_distribution,
)
from deitpipe.shards.format.verify import find_stray_files, verify_shards
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.shards.storage import file_sha256


@pytest.mark.parametrize("version", [2, 1])
def test_write_three_read_back_identical(tmp_path, sample_maker, version):
    samples = [sample_maker(i, softmax=(i == 1)) for i in range(3)]
    with ShardFileWriter(tmp_path, "shard-000000.tar") as w:
        for s in samples:
            w.write(encode_sample(**s, schema_version=version))
    assert w.count == 3 and w.sha256 == file_sha256(tmp_path / "shard-000000.tar")
    got = list(iter_samples(str(tmp_path / "shard-000000.tar")))
    assert [g["key"] for g in got] == [s["key"] for s in samples]
    for g, s in zip(got, samples):
        assert g["image"] == s["image_bytes"] and g["image_ext"] == "png"
        assert g["label"] == s["label"] and g["meta"] == s["meta"]
        for name, arr in s["views"].items():
            assert g[name].dtype == arr.dtype and np.array_equal(g[name], arr), name
    assert "softmax" in got[1] and "softmax" not in got[0]


@pytest.mark.parametrize("version, views", [(2, [schema.VIEWS]), (1, list(schema.V1_VIEW_MEMBERS) + [schema.SOFTMAX])])
def test_member_order_and_deterministic_headers(tmp_path, sample_maker, version, views):
    with ShardFileWriter(tmp_path, "a.tar") as w:
        w.write(encode_sample(**sample_maker(0, softmax=True), schema_version=version))
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name.split(".", 1)[1] for m in members]
    assert names == ["png", "cls", "json"] + views
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)


def test_rewrite_is_byte_identical(tmp_path, shard_set_writer):
    shard_set_writer(tmp_path / "a")
    shard_set_writer(tmp_path / "b")
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writer_leaves_nothing_on_exception(tmp_path, sample_maker):
    with pytest.raises(RuntimeError, match="teacher died"):
        with ShardFileWriter(tmp_path, "shard-000000.tar") as w:
            w.write(encode_sample(**sample_maker(0)))
            raise RuntimeError("teacher died")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_keys(tmp_path, sample_maker):
    with pytest.raises(ValueError, match="duplicate"):
        with ShardFileWriter(tmp_path, "x.tar") as w:
            w.write(encode_sample(**sample_maker(0)))
            w.write(encode_sample(**sample_maker(0)))
    assert list(tmp_path.iterdir()) == []


def test_encode_sample_validates(sample_maker):
    s = sample_maker(0)
    with pytest.raises(ValueError, match="key"):
        encode_sample(**{**s, "key": "a.b"})
    with pytest.raises(ValueError, match="image_ext"):
        encode_sample(**{**s, "image_ext": "jpeg"})
    with pytest.raises(ValueError, match="lack"):
        encode_sample(**{**s, "views": {k: v for k, v in s["views"].items() if k != "rest"}})
    with pytest.raises(ValueError, match="disagree"):
        encode_sample(**{**s, "views": {**s["views"], "flip": np.zeros(7, np.uint8)}})
    with pytest.raises(ValueError, match="uint16 or int32"):
        encode_sample(**{**s, "views": {**s["views"], "hard": s["views"]["hard"].astype(np.int64)}})
    with pytest.raises(ValueError, match="wrong shapes"):
        encode_sample(**{**s, "views": {**s["views"], "prob": s["views"]["prob"][:, :2]}})
    with pytest.raises(ValueError, match="wrong shapes"):
        encode_sample(**{**s, "views": {**s["views"], "box": s["views"]["box"][:, :3]}})
    with pytest.raises(ValueError, match="softmax has 10 columns, num_classes is 12"):
        encode_sample(**{**sample_maker(0, softmax=True), "num_classes": 12})
    with pytest.raises(ValueError, match="schema_version 4"):
        encode_sample(**s, schema_version=4)
    with pytest.raises(ValueError, match="schema version 3 needs the augmentation record"):
        encode_sample(**s, schema_version=3)
    cast = encode_sample(**{**s, "views": {**s["views"], "prob": s["views"]["prob"].astype(np.float32)}})
    assert decode_sample({**cast, "__url__": "u"})["prob"].dtype == np.float16


@pytest.mark.parametrize("version", [2, 1])
def test_teacher_distribution_topk_and_full(sample_maker, version):
    s = sample_maker(3, views=2, topk=3, num_classes=10, softmax=True)
    raw = encode_sample(**s, schema_version=version)
    full = decode_sample({**raw, "__url__": "u"})
    topk_only = {k: v for k, v in full.items() if k != "softmax"}
    for view in range(3):
        d_full = teacher_distribution(full, view, 10)
        row = s["views"]["softmax"][view].astype(np.float64)
        assert d_full.dtype == np.float32 and np.allclose(d_full, row / row.sum(), atol=1e-6)
        d = teacher_distribution(topk_only, view, 10)
        assert d.shape == (10,) and abs(d.sum() - 1) < 1e-6
        idx = s["views"]["topk"][view]
        assert np.allclose(d[idx], s["views"]["prob"][view], atol=2e-3)
        others = np.delete(d, idx)
        assert np.allclose(others, others[0])  # leftover spread uniformly
        assert np.allclose(others[0], float(s["views"]["rest"][view]) / 7, atol=2e-3)


def test_teacher_distribution_when_topk_covers_all_classes(sample_maker):
    s = decode_sample({**encode_sample(**sample_maker(0, topk=4, num_classes=4)), "__url__": "u"})
    d = teacher_distribution(s, 0, 4)
    assert abs(d.sum() - 1) < 1e-6 and np.allclose(d[s["topk"][0]], s["prob"][0] / s["prob"][0].sum(), atol=1e-3)


def test_expand_urls_manifest_order_and_braces(shard_set, tmp_path):
    out, _ = shard_set
    assert expand_urls(out) == [str(out / "shard-000000.tar"), str(out / "shard-000001.tar")]
    assert expand_urls(f"{out}/shard-{{000000..000001}}.tar") == expand_urls(out)
    keys = [s["__key__"] for s in iter_tar_samples(str(out))]
    assert keys == [schema.sample_key(i) for i in range(5)]
    piped = [s["__key__"] for s in iter_tar_samples(f"pipe:cat {out}/shard-000001.tar")]
    assert piped == keys[3:]


def test_manifest_round_trip_and_errors(tmp_path):
    path = write_manifest(tmp_path, {"shards": [], "class_names": ["a"]})
    data = read_manifest(tmp_path)
    assert data["schema_version"] == schema.SCHEMA_VERSION and data["class_names"] == ["a"]
    assert read_manifest(path) == data
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"schema_version": 999, "shards": []}))
    with pytest.raises(ManifestError, match="schema_version 999"):
        read_manifest(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left


def test_verify_clean_set(shard_set):
    out, _ = shard_set
    assert verify_shards(out) == []
    assert verify_shards(out, deep=True) == []
    assert find_stray_files(out) == []


def test_verify_detects_corruption_and_wrong_count(shard_set):
    out, _ = shard_set
    shard = out / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    manifest = read_manifest(out)
    manifest["shards"][1]["samples"] = 3
    write_manifest(out, manifest)
    problems = verify_shards(out)
    assert any("shard-000000.tar" in p and "sha256" in p for p in problems)
    assert any("shard-000001.tar" in p and "2 samples, manifest says 3" in p for p in problems)


def test_verify_missing_truncated_and_stray(shard_set):
    out, _ = shard_set
    (out / "shard-000001.tar").unlink()
    shard = out / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    (out / ".shard-000002.tar.tmp-123").write_bytes(b"x")
    problems = verify_shards(out)
    assert any("shard-000001.tar" in p and "missing" in p for p in problems)
    assert any("shard-000000.tar" in p for p in problems)
    assert not any("tmp-123" in p for p in problems)
    assert any("tmp-123" in w for w in find_stray_files(out))


def test_shards_md_example_runs(shard_set, capsys):
    import re
    from pathlib import Path

    out, samples = shard_set
    doc = (Path(__file__).parents[1] / "SHARDS.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    exec(compile(code.replace("out/shard-", f"{out}/shard-"), "SHARDS.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [s["key"] for s in samples]


def test_load_npy_reads_repeated_headers_exactly_and_never_unpickles():
    import io

    from deitpipe.shards.format.reader import load_npy

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    arrays = [np.arange(12, dtype=np.int32).reshape(3, 4), np.asfortranarray(np.arange(12.0).reshape(3, 4)),
              np.float16([1.5, -2.0]), np.array(7, dtype=np.int64), np.zeros((0, 4), np.uint16),
              np.array([True, False])]
    for a in arrays:
        for variant in (a, a + 1 if a.dtype != bool else ~a):  # the second read takes the remembered header
            got = load_npy(npy(variant))
            assert got.dtype == variant.dtype and got.shape == variant.shape and got.flags.writeable
            np.testing.assert_array_equal(got, variant)
    data = npy(np.arange(12, dtype=np.int32).reshape(3, 4))
    with pytest.raises(ValueError):
        load_npy(data[:-4])  # truncated, with a remembered header
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(npy(np.array([{"a": 1}], dtype=object)))


def test_read_shard_splits_our_shards_itself_and_matches_webdataset(shard_set, tmp_path):
    from deitpipe.shards.format.reader import read_shard
    from deitpipe.shards.format.tarsamples import split_ustar

    out, _ = shard_set
    for url in expand_urls(str(out)):
        data = open(url, "rb").read()
        assert split_ustar(data, url) is not None  # the fast path, not the fallback
        assert read_shard(url) == list(iter_tar_samples(url))
        assert read_shard(f"pipe:cat {url}") == list(iter_tar_samples(f"pipe:cat {url}"))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_read_shard_reads_other_tars_through_webdataset(tmp_path, fmt):
    import io

    from deitpipe.shards.format.reader import read_shard
    from deitpipe.shards.format.tarsamples import split_ustar

    path = tmp_path / "other.tar"
    long_key = "k" * 120  # longer than a ustar name field
    with tarfile.open(path, "w", format=fmt) as tar:
        for key in ("a", long_key):
            for ext, data in (("cls", b"1"), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert split_ustar(path.read_bytes(), str(path)) is None
    samples = read_shard(str(path))
    assert samples == list(iter_tar_samples(str(path)))
    assert [s["__key__"] for s in samples] == ["a", long_key]


def test_read_shard_of_a_truncated_shard_raises(shard_set, tmp_path):
    from deitpipe.shards.format.reader import read_shard

    out, _ = shard_set
    url = expand_urls(str(out))[0]
    cut = tmp_path / "cut.tar"
    whole = open(url, "rb").read()
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    inside_data, at_header, inside_header = members[0].offset_data + 10, members[2].offset, members[2].offset + 100
    for size, where in ((inside_data, "member .* ends past the end"), (at_header, "before its end-of-archive"),
                        (inside_header, "before its end-of-archive")):
        cut.write_bytes(whole[:size])
        with pytest.raises(ValueError, match=f"truncated shard: .*{where}"):
            read_shard(str(cut))


def _npy_declaring(shape, dtype="<f4", payload=b"\0" * 8):
    """``.npy`` bytes whose header declares ``shape`` but which hold only ``payload``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("shape, declared", [((10**12,), 4 * 10**12), ((10**10, 10**10), 4 * 10**20), ((3,), 12)])
def test_load_npy_checks_the_declared_size_before_allocating(shape, declared):
    from deitpipe.shards.format.reader import load_npy

    for _ in range(2):  # the second read takes the remembered header
        with pytest.raises(ValueError, match=f"^npy member declares {declared} bytes but holds 8$"):
            load_npy(_npy_declaring(shape))


@pytest.mark.parametrize("version, member", [(1, schema.PROB), (2, schema.VIEWS)])
def test_a_shard_member_declaring_a_huge_array_is_a_value_error(sample_maker, version, member):
    raw = {**encode_sample(**sample_maker(0), schema_version=version), "__url__": "u"}
    raw[member] = _npy_declaring((10**12, 3), dtype="<f2")
    with pytest.raises(ValueError, match="declares 6000000000000 bytes but holds 8"):
        decode_sample(raw)
    raw[member] = _npy_declaring((1,), dtype="|O")
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_sample(raw)


def test_shard_names_of_object_uris():
    from deitpipe.shards.format.reader import shard_name

    assert shard_name("s3://bucket/my run/shard-000001.tar") == "shard-000001.tar"
    assert shard_name("s3://bucket/run/shard-000002.tar") == "shard-000002.tar"

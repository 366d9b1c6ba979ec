"""Input listing: ImageFolder traps, digits, WebDataset tars, and source resolution."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from deitpipe.shards.image import ImageDecodeError, decode_image, sniff_image_type
from deitpipe.shards.sources import (
    digits_image_folder,
    digits_source,
    digits_split,
    is_non_image_name,
    list_image_folder,
    list_webdataset,
    read_bytes,
    resolve_source,
)


def test_image_folder_listing(image_folder):
    cands, classes, ignored = list_image_folder(image_folder)
    assert classes == ["cat", "dog", "empty"]
    assert [(c.path, c.label) for c in cands] == [
        ("cat/a.jpg", 0), ("cat/b.JPEG", 0), ("cat/c.jpg", 0), ("cat/sub/d.png", 0), ("dog/e", 1), ("dog/f.jpg", 1)
    ]
    assert ignored == ["README.md", "cat/.DS_Store", "cat/notes.txt", "dog/.hidden", "dog/labels.json"]


def test_image_folder_content_decides(image_folder):
    cands, _, _ = list_image_folder(image_folder)
    by_path = {c.path: read_bytes(c) for c in cands}
    assert sniff_image_type(by_path["cat/b.JPEG"]) == "png"  # the name lies, the bytes do not
    assert decode_image(by_path["cat/b.JPEG"]).mode == "RGB"
    assert decode_image(by_path["dog/e"]).mode == "RGB"
    for bad, reason in (("cat/c.jpg", "truncated"), ("dog/f.jpg", "zero bytes")):
        with pytest.raises(ImageDecodeError, match=reason):
            decode_image(by_path[bad])


@pytest.mark.parametrize(
    "name, ignored",
    [(".DS_Store", True), ("._a.jpg", True), ("notes.TXT", True), ("x.json", True), ("a.csv", True),
     ("a.jpg", False), ("a.JPEG", False), ("noext", False), ("a.heic", False), ("scan.tif", False)],
)
def test_non_image_name_rule(name, ignored):
    assert is_non_image_name(name) is ignored


def test_image_folder_without_classes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="no class sub-folders"):
        list_image_folder(tmp_path)


def test_digits_source():
    cands, classes = digits_source(image_size=24)
    assert len(cands) == 1797 and classes == [str(i) for i in range(10)]
    assert cands[123].path == "digits/000123"
    assert {c.label for c in cands} == set(range(10))
    img = decode_image(read_bytes(cands[0]))
    assert img.size == (24, 24) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.max() > 200 and arr.min() < 30  # ink and background both present
    assert read_bytes(cands[0]) == read_bytes(digits_source(image_size=24)[0][0])


def test_digits_split_is_stratified_and_deterministic():
    train, held = digits_split(seed=0)
    assert len(train) == 1200 and len(held) == 597
    assert set(train).isdisjoint(held) and len(set(train) | set(held)) == 1797
    again = digits_split(seed=0)
    assert np.array_equal(train, again[0]) and not np.array_equal(held, digits_split(seed=1)[1])
    labels = np.array([c.label for c in digits_source()[0]])
    assert np.all(np.abs(np.bincount(labels[held], minlength=10) - 59.7) <= 2)


def test_digits_image_folder(tmp_path):
    out = digits_image_folder(tmp_path / "d", image_size=16, seed=0)
    train, classes, ignored = list_image_folder(out / "train")
    val, _, _ = list_image_folder(out / "val")
    assert len(train) == 1200 and len(val) == 597 and classes == [str(i) for i in range(10)] and ignored == []
    stamp = (out / "train" / "0").stat().st_mtime_ns
    digits_image_folder(tmp_path / "d", image_size=16, seed=0)  # complete: reused, not rebuilt
    assert (out / "train" / "0").stat().st_mtime_ns == stamp
    assert not any(p.name.startswith(".digits-tmp") for p in out.iterdir())


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_webdataset_source_round_trip(tmp_path, image_bytes):
    _write_tar(tmp_path / "in-000000.tar", [
        {"__key__": "a", "jpg": image_bytes["rgb_jpeg"], "cls": b"3"},
        {"__key__": "b", "png": image_bytes["rgb_png"]},  # no cls
    ])
    _write_tar(tmp_path / "in-000001.tar", [
        {"__key__": "c", "cls": b"1"},  # no image
        {"__key__": "d", "webp": image_bytes["webp"], "cls": b"0", "txt": b"caption"},
    ])
    spec = str(tmp_path / "in-{000000..000001}.tar")
    cands, skipped = list_webdataset(spec)
    assert [c.label for c in cands] == [3, 0]
    assert read_bytes(cands[0]) == image_bytes["rgb_jpeg"] and read_bytes(cands[1]) == image_bytes["webp"]
    assert cands[0].path.endswith("in-000000.tar#a")
    assert [(p.rsplit("#", 1)[1], "cls" in r) for p, r in skipped] == [("b", True), ("c", False)]
    src = resolve_source(spec)
    assert src.class_names == ["0", "1", "2", "3"] and len(src.skipped) == 2


def test_local_tars_are_indexed_not_held_in_memory(tmp_path, image_bytes):
    samples = [{"__key__": f"s{i:03d}", "jpg": image_bytes["rgb_jpeg"] + bytes([i]), "cls": str(i % 3).encode()}
               for i in range(5)]
    _write_tar(tmp_path / "in-000000.tar", samples)
    local, _ = list_webdataset(str(tmp_path / "in-000000.tar"))
    streamed, _ = list_webdataset(f"pipe:cat {tmp_path}/in-000000.tar")
    assert all(c.kind == "tarmember" and c.data is None and c.length > 0 for c in local)
    assert all(c.kind == "tar" and c.data is not None for c in streamed)
    assert [c.label for c in local] == [c.label for c in streamed] == [0, 1, 2, 0, 1]
    assert [read_bytes(c) for c in local] == [read_bytes(c) for c in streamed] == [s["jpg"] for s in samples]
    assert [c.path.rsplit("#", 1)[1] for c in local] == [s["__key__"] for s in samples]


def test_compressed_local_tars_are_read_as_streams(tmp_path, image_bytes):
    import gzip

    _write_tar(tmp_path / "in.tar", [{"__key__": "a", "jpg": image_bytes["rgb_jpeg"], "cls": b"2"}])
    (tmp_path / "in.tgz.tar").write_bytes(gzip.compress((tmp_path / "in.tar").read_bytes()))
    (cand,), _ = list_webdataset(str(tmp_path / "in.tgz.tar"))
    assert cand.kind == "tar" and cand.label == 2 and read_bytes(cand) == image_bytes["rgb_jpeg"]


def test_a_tar_truncated_after_indexing_is_an_oserror(tmp_path, image_bytes):
    path = tmp_path / "in-000000.tar"
    _write_tar(path, [{"__key__": "a", "jpg": image_bytes["rgb_jpeg"], "cls": b"1"}])
    (cand,), _ = list_webdataset(str(path))
    path.write_bytes(path.read_bytes()[: cand.offset + 10])
    with pytest.raises(OSError, match="truncated"):
        read_bytes(cand)


def test_resolve_source(image_folder, tmp_path):
    assert len(resolve_source("digits").candidates) == 1797
    assert len(resolve_source("digits:val").candidates) == 597
    folder = resolve_source(str(image_folder))
    assert folder.class_names == ["cat", "dog", "empty"] and "cat/notes.txt" in folder.ignored
    with pytest.raises(ValueError, match="nowhere/imgs"):
        resolve_source(str(tmp_path / "nowhere/imgs"))

"""Input listing: ImageFolder traps, digits, WebDataset tars, and source resolution."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from deitpipe.shards.format.image import ImageDecodeError, decode_image, sniff_image_type
from deitpipe.shards.inputs import INPUTS, Candidate, read_bytes, resolve_source
from deitpipe.shards.inputs.embedded import digits_image_folder, digits_source, digits_split
from deitpipe.shards.inputs.folder import is_non_image_name, list_image_folder
from deitpipe.shards.inputs.tars import list_webdataset


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


def test_each_input_kind_reads_its_own_candidates(image_folder, tmp_path, monkeypatch):
    # One input per form of specification, and one input reads each candidate kind.
    kinds = [kind for i in INPUTS for kind in i.kinds]
    assert len(kinds) == len(set(kinds))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a named set goes before a directory of that name
    chosen = {spec: next(i.name for i in INPUTS if i.accepts(spec))
              for spec in ("digits", "cluttered-digits:val", str(image_folder), "x-{000..009}.tar", "s3://b/p/")}
    assert list(chosen.values()) == ["embedded", "embedded", "folder", "tars", "tars"]
    with pytest.raises(ValueError, match="cannot read bytes of kind 'other'"):
        read_bytes(Candidate(path="p", label=0, kind="other"))


def _list_with_deadline(root, seconds=20.0):
    """``list_image_folder`` in a thread, so that a listing that never ends fails the test instead of hanging it."""
    import threading

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=list_image_folder(root)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "listing did not finish: a symlink loop is followed forever"
    return result["out"]


def test_image_folder_symlink_loops_end_and_count_each_image_once(tmp_path, image_bytes):
    root, jpeg = tmp_path / "imgs", image_bytes["rgb_jpeg"]
    for rel in ("cat/a.jpg", "dog/x/b.jpg", "dog/y/c.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg + rel.encode())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "d.jpg").write_bytes(jpeg)
    (root / "cat" / "self").symlink_to(".")  # a class folder holding a link to itself
    (root / "cat" / "dogs").symlink_to("../dog")  # a link into another class
    (root / "cat" / "more").symlink_to(tmp_path / "outside")  # a link out of the tree is followed
    (root / "dog" / "x" / "to-y").symlink_to("../y")  # two folders linking to each other
    (root / "dog" / "y" / "to-x").symlink_to("../x")
    (root / "dog" / "b-again.jpg").symlink_to("x/b.jpg")  # a second path to one file
    cands, classes, ignored = _list_with_deadline(root)
    assert classes == ["cat", "dog"]
    assert [(c.path, c.label) for c in cands] == [
        ("cat/a.jpg", 0), ("cat/more/d.jpg", 0), ("dog/x/b.jpg", 1), ("dog/y/c.jpg", 1)
    ]
    assert ignored == ["cat/dogs", "cat/self", "dog/b-again.jpg", "dog/x/to-y", "dog/y/to-x"]
    assert [read_bytes(c) for c in cands][2] == jpeg + b"dog/x/b.jpg"


def test_image_folder_prefers_the_path_without_a_link(tmp_path, image_bytes):
    root = tmp_path / "imgs"
    (root / "cat" / "real").mkdir(parents=True)
    (root / "cat" / "real" / "a.jpg").write_bytes(image_bytes["rgb_jpeg"])
    (root / "cat" / "a-link").symlink_to("real")  # sorts before "real": still not the one listed
    (root / "cat" / "a-file.jpg").symlink_to("real/a.jpg")
    cands, _, ignored = _list_with_deadline(root)
    assert [c.path for c in cands] == ["cat/real/a.jpg"] and ignored == ["cat/a-file.jpg", "cat/a-link"]


def _tar_of(path, members):
    """A tar of ``(name, bytes)`` members in the given order (duplicates allowed, unlike TarWriter)."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("streamed", [False, True])
def test_webdataset_duplicate_keys_keep_the_first_and_are_skipped(tmp_path, image_bytes, streamed):
    jpeg = image_bytes["rgb_jpeg"]
    path = tmp_path / "train-0.tar"
    _tar_of(path, [
        ("a.cls", b"0"), ("a.jpg", jpeg + b"a1"),
        ("b.cls", b"1"), ("b.jpg", jpeg + b"b1"),
        ("b.cls", b"2"), ("b.jpg", jpeg + b"b2"),  # adjacent repeat
        ("c.cls", b"2"), ("c.jpg", jpeg + b"c1"),
        ("a.cls", b"2"), ("a.jpg", jpeg + b"a2"),  # repeat after other keys
    ])
    spec = f"pipe:cat {path}" if streamed else str(path)
    cands, skipped = list_webdataset(spec)
    assert [(c.path.rsplit("#", 1)[1], c.label) for c in cands] == [("a", 0), ("b", 1), ("c", 2)]
    assert [read_bytes(c)[-2:] for c in cands] == [b"a1", b"b1", b"c1"]
    assert skipped == [(f"{spec}#b", f"duplicate sample key b in {spec}"),
                       (f"{spec}#a", f"duplicate sample key a in {spec}")]
    src = resolve_source(spec)
    assert len(src.candidates) + len(src.skipped) == 5  # every sample found: labelled or skipped


def _truncations(path):
    """(description, bytes) of ``path`` damaged where a copy or download can stop or go wrong."""
    import tarfile

    whole = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = members[2]
    garbage = bytearray(whole)
    garbage[third.offset:third.offset + 512] = b"\xab" * 512
    return [
        ("inside a member's data", whole[: members[1].offset_data + 5]),
        ("at a member boundary", whole[: third.offset]),
        ("inside a header", whole[: third.offset + 100]),
        ("before the end-of-archive block", whole[: members[-1].offset_data + -(-members[-1].size // 512) * 512]),
        ("a corrupt header", bytes(garbage)),
    ]


@pytest.mark.parametrize("streamed", [False, True])
def test_truncated_or_corrupt_input_tar_is_one_line_naming_it(tmp_path, image_bytes, streamed):
    good = tmp_path / "good.tar"
    _write_tar(good, [{"__key__": f"k{i}", "jpg": image_bytes["rgb_jpeg"], "cls": b"1"} for i in range(3)])
    assert len(list_webdataset(str(good))[0]) == 3
    bad = tmp_path / "train-0.tar"
    for where, data in _truncations(good):
        bad.write_bytes(data)
        spec = f"pipe:cat {bad}" if streamed else str(bad)
        with pytest.raises(ValueError, match=r"train-0\.tar: not a readable tar \(truncated or corrupt\): ") as err:
            list_webdataset(spec)
        assert "\n" not in str(err.value), where


def test_truncated_compressed_input_tar_is_one_line(tmp_path, image_bytes):
    import gzip

    plain = tmp_path / "plain.tar"
    _write_tar(plain, [{"__key__": f"k{i}", "jpg": image_bytes["rgb_jpeg"], "cls": b"1"} for i in range(3)])
    packed = gzip.compress(plain.read_bytes())
    (tmp_path / "in.tar").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=r"in\.tar: not a readable tar \(truncated or corrupt\)"):
        list_webdataset(str(tmp_path / "in.tar"))


def test_shard_and_tar_specs_are_told_apart_in_one_place(tmp_path):
    from deitpipe.shards.specs import is_shard_set, is_tar_spec

    for spec in ("a.tar", "x/train-{000..009}.tar", "a.tar::b.tar", "pipe:cat a.tar", "s3://b/x.tar",
                 "https://h/x-{0..1}.tar"):
        assert is_tar_spec(spec) and is_shard_set(spec), spec
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert not is_tar_spec(str(folder)) and not is_shard_set(str(folder)) and not is_shard_set("digits:val")
    (folder / "manifest.json").write_text("{}")
    assert is_shard_set(str(folder))

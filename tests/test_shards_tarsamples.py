"""One grouping of tar members into samples, whether a shard is split in memory or read by tarfile."""

from __future__ import annotations

import io
import tarfile

from deitpipe.shards.format.reader import expand_urls
from deitpipe.shards.format.tarsamples import group_members, split_ustar, tarfile_members


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_both_ways_of_reading_members_group_a_shard_alike(shard_set):
    out, samples = shard_set
    for url in expand_urls(str(out)):
        data = open(url, "rb").read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            through_tarfile = list(group_members(tarfile_members(tar), url))
        assert split_ustar(data, url) == through_tarfile
    assert sum(len(split_ustar(open(u, "rb").read(), u)) for u in expand_urls(str(out))) == len(samples)


def test_offsets_point_at_the_member_bytes():
    data = _tar([("a.cls", b"1"), ("a.jpg", b"JPEGBYTES"), ("b.cls", b"2"), ("b.png", b"PNG")])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        samples = list(group_members(tarfile_members(tar, info=True, read=("cls",)), "u"))
    assert [(s["__key__"], s["cls"]) for s in samples] == [("a", b"1"), ("b", b"2")]
    for sample, ext, want in ((samples[0], "jpg", b"JPEGBYTES"), (samples[1], "png", b"PNG")):
        info = sample[ext]
        assert data[info.offset_data:info.offset_data + info.size] == want


def test_a_repeated_member_starts_a_sample_with_the_same_key():
    members = [("a", "cls", b"1"), ("a", "jpg", b"x"), ("a", "jpg", b"y"), ("b", "cls", b"2")]
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in group_members(members, "u")] == [
        ("a", ["cls", "jpg"]), ("a", ["jpg"]), ("b", ["cls"])]
    # The shard reader leaves such a tar to webdataset, which refuses it.
    assert split_ustar(_tar([("a.cls", b"1"), ("a.jpg", b"x"), ("a.jpg", b"y")]), "u") is None

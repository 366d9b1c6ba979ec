"""Object storage through ``shards.storage``, against a real S3 API (moto's server) on loopback."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import pytest

from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import read_manifest
from deitpipe.shards.format.reader import decode_sample, expand_urls, iter_tar_samples, read_shard
from deitpipe.shards.format.verify import verify_shards


def keys_under(bucket: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(bucket)
    return sorted(i.path.split("/", 1)[1] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.is_file)


def upload_dir(local: Path, prefix: str) -> None:
    for p in sorted(local.iterdir()):
        storage.upload(p, storage.join(prefix, p.name))


def test_round_trip_and_listing(s3_bucket):
    uri = storage.join(s3_bucket, "run", "a.bin")
    assert not storage.is_file(uri) and storage.size(uri) is None and storage.list_names(s3_bucket) == []
    storage.write_bytes(uri, b"0123456789")
    storage.write_bytes(storage.join(s3_bucket, "run", "sub", "b.bin"), b"x")
    assert storage.read_bytes(uri) == b"0123456789"
    assert storage.read_range(uri, 3, 4) == b"3456"
    assert storage.is_file(uri) and storage.size(uri) == 10
    assert storage.is_dir(storage.join(s3_bucket, "run")) and not storage.is_dir(uri)
    assert storage.list_names(storage.join(s3_bucket, "run")) == ["a.bin", "sub"]
    storage.remove(uri)
    assert keys_under(s3_bucket) == ["run/sub/b.bin"]  # no temporary key is left behind either
    storage.remove_tree(storage.join(s3_bucket, "run"))
    assert keys_under(s3_bucket) == []


def test_failed_write_leaves_no_object(s3_bucket):
    uri = storage.join(s3_bucket, "shards", "shard-000000.tar")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_output(uri) as f:
            f.write(b"half a shard")
            raise RuntimeError("boom")
    assert keys_under(s3_bucket) == []

    class Failing(io.RawIOBase):  # a source that breaks after the first 8 MiB were sent
        sent = 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.sent:
                raise OSError("disk read error")
            self.sent = len(b)
            b[:] = bytes(len(b))
            return len(b)

    with pytest.raises(OSError, match="disk read error"):
        storage.upload(io.BufferedReader(Failing()), uri)
    assert keys_under(s3_bucket) == []  # neither the final key nor the temporary one


def test_errors_are_one_line_naming_uri_and_cause(s3_bucket, monkeypatch):
    missing = s3_bucket + "-missing/shards/manifest.json"
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes(missing, b"{}")
    assert str(err.value) == f"{missing}: no such bucket"
    with pytest.raises(storage.StorageError, match="no such object"):
        storage.read_bytes(storage.join(s3_bucket, "nothing.tar"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    with pytest.raises(storage.StorageError) as err:
        storage.size(storage.join(s3_bucket, "x"))
    assert str(err.value) == f"{s3_bucket}/x: endpoint unreachable (http://127.0.0.1:{port})"
    assert "\n" not in str(err.value)


def test_s3_options_from_the_aws_environment():
    opts = storage.s3_options({"AWS_ENDPOINT_URL": "https://general:1", "AWS_ENDPOINT_URL_S3": "http://10.0.0.1:9000",
                               "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "k",
                               "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"})
    assert opts["endpoint_override"] == "10.0.0.1:9000" and opts["scheme"] == "http"  # the S3-specific one wins
    assert (opts["region"], opts["access_key"], opts["secret_key"], opts["session_token"]) == ("eu-west-1", "k", "s", "t")
    opts = storage.s3_options({"AWS_ENDPOINT_URL": "minio.local:9000", "AWS_REGION": "us-west-2",
                               "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (opts["endpoint_override"], opts["scheme"], opts["region"]) == ("minio.local:9000", "https", "us-west-2")
    assert "access_key" not in opts  # the SDK's own chain (files, instance roles)
    with pytest.raises(storage.StorageError, match="not an http"):
        storage.s3_options({"AWS_ENDPOINT_URL_S3": "ftp://x"})


def test_shards_read_from_a_bucket_as_from_disk(s3_bucket, shard_set):
    local, _ = shard_set
    prefix = storage.join(s3_bucket, "shards")
    upload_dir(local, prefix)
    urls = expand_urls(prefix)
    assert urls == [storage.join(prefix, Path(u).name) for u in expand_urls(str(local))]
    assert read_manifest(prefix) == read_manifest(local)
    remote = [decode_sample(s) for s in iter_tar_samples(urls)]
    here = [decode_sample(s) for s in iter_tar_samples(str(local))]
    assert [s["key"] for s in remote] == [s["key"] for s in here] and len(remote) == 5
    assert all((a["box"] == b["box"]).all() and a["image"] == b["image"] for a, b in zip(remote, here))
    assert [s["__key__"] for s in read_shard(urls[0])] == [s["__key__"] for s in read_shard(expand_urls(str(local))[0])]
    assert verify_shards(prefix, deep=True) == []
    # a shard replaced behind the manifest is caught by its sha256
    storage.write_bytes(urls[0], storage.read_bytes(urls[1]))
    assert any("sha256" in p for p in verify_shards(prefix))


def test_a_key_is_never_a_shell_command(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("x;touch pwned;.tar", "$(touch pwned2).tar", "my run/shard-000001.tar"):
        uri = f"{s3_bucket}/{name}"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("k.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"3"))
        storage.write_bytes(uri, buf.getvalue())
        assert [s["__key__"] for s in iter_tar_samples(uri)] == ["k"]
    assert not list(tmp_path.iterdir())


def test_manifest_of_a_prefix_names_the_uri_when_missing(s3_bucket):
    from deitpipe.shards.format.manifest import ManifestError

    with pytest.raises(ManifestError, match=f"{s3_bucket}/nowhere/{schema.MANIFEST_NAME}: cannot read"):
        read_manifest(f"{s3_bucket}/nowhere")


@pytest.mark.parametrize("message, cause", [
    ("When reading information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject operation: "
     "No response body.", "access denied"),
    ("When listing objects under key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) during ListObjectsV2 "
     "operation: Unable to parse ExceptionName: AccessDenied", "access denied"),
    ("When getting information for key 'k' in bucket 'b': AWS Error INVALID_ACCESS_KEY_ID during HeadObject "
     "operation: The AWS Access Key Id you provided does not exist", "invalid credentials"),
    ("When initiating multiple part upload for key 'k' in bucket 'b': AWS Error NO_SUCH_BUCKET during "
     "CreateMultipartUpload operation: The specified bucket does not exist", "no such bucket"),
    ("Something new\nwith a second line", "Something new"),
])
def test_pyarrow_errors_become_one_line_causes(message, cause):
    err = storage.storage_error("s3://b/k", OSError(message))
    assert str(err) == f"s3://b/k: {cause}" and err.cause == cause

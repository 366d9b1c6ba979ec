"""Files in a local directory or in object storage (``s3://bucket/prefix``), through one set of calls.

Object storage goes through ``pyarrow.fs.S3FileSystem`` (the client Ray uses too), configured
from the standard AWS environment, read explicitly so every process and node agrees:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible server such as MinIO),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` (else the SDK's own chain: config files, instance roles).

Writes appear whole or not at all, on disk and in a bucket alike. A local file goes through
``atomic.atomic_writer`` (temporary name, fsync, rename). An object is first written in full to
a local temporary file, uploaded under a temporary key beside its destination
(``.NAME.tmp-PID-N``, the same pattern as on disk) and then copied to its final key by the
server, so an interrupted upload never leaves a partial object under a final name; a leftover
temporary key is what a rerun's clean-up recognises.

:func:`open_url` also opens what a shard or input specification may name beyond these:
``pipe:`` commands and ``http(s)://`` URLs, through webdataset's ``gopen``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

from deitpipe.shards.storage.atomic import atomic_writer, temp_path

OBJECT_SCHEMES = ("s3://",)
_CHUNK = 8 << 20


class StorageError(OSError):
    """A read or write of object storage failed; the message is one line naming the URI."""

    def __init__(self, uri: str, cause: str | None = None) -> None:
        super().__init__(uri if cause is None else f"{uri}: {cause}")  # one argument: it pickles as one
        self.uri, self.cause = uri, cause if cause is not None else uri


def is_object_uri(uri: str | os.PathLike | None) -> bool:
    """Whether ``uri`` names object storage (``s3://bucket/key``)."""
    return uri is not None and os.fspath(uri).startswith(OBJECT_SCHEMES)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a local directory or an object prefix."""
    base = os.fspath(base)
    if is_object_uri(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def s3_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``S3FileSystem`` keyword arguments from the AWS environment variables (see module doc)."""
    env = dict(os.environ if env is None else env)
    options: dict[str, Any] = {"connect_timeout": 10.0, "request_timeout": 60.0}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError("AWS_ENDPOINT_URL", f"{endpoint!r} is not an http(s):// URL")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            options["session_token"] = env["AWS_SESSION_TOKEN"]
    return options


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """``(pyarrow filesystem, path in it)`` for a local path or an ``s3://`` URI."""
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if is_object_uri(uri):
        path = uri.split("://", 1)[1].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(uri, "expected s3://BUCKET/KEY")
        return _s3(tuple(sorted(s3_options().items()))), path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@functools.lru_cache(maxsize=4)
def _s3(options: tuple[tuple[str, Any], ...]) -> Any:
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(**dict(options), retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """One line for a failed object-storage call: the URI and the cause in words."""
    text = str(exc)
    causes = (("NO_SUCH_BUCKET", "no such bucket"), ("ACCESS_DENIED", "access denied"),
              ("HTTP status 403", "access denied"), ("NETWORK_CONNECTION", "endpoint unreachable"),
              ("curlCode: 7", "endpoint unreachable"), ("Path does not exist", "no such object"),
              ("INVALID_ACCESS_KEY_ID", "invalid credentials"), ("SIGNATURE_DOES_NOT_MATCH", "invalid credentials"))
    cause = next((words for marker, words in causes if marker in text), None)
    if cause is None:
        cause = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)[:200]
    if cause == "no such object" and _bucket_missing(uri):
        cause = "no such bucket"  # S3 answers a GET in a missing bucket as a missing key
    if cause == "endpoint unreachable":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        cause += f" ({endpoint})" if endpoint else ""
    return StorageError(uri, cause)


def _bucket_missing(uri: str) -> bool:
    """Whether the bucket of ``uri`` is known not to exist (False when that cannot be told)."""
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(uri)
        return fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except OSError:
        return False


@contextlib.contextmanager
def _errors(uri: str) -> Iterator[None]:
    if not is_object_uri(uri):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(uri, exc) from exc


def _info(uri: str) -> Any:
    fs, path = filesystem(uri)
    with _errors(uri):
        return fs.get_file_info(path)


def is_file(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a file (an object)."""
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if not is_object_uri(uri):
        return os.path.isfile(uri)
    return _info(uri).type == pafs.FileType.File


def is_symlink(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a local symbolic link (objects never are)."""
    uri = os.fspath(uri)
    return not is_object_uri(uri) and os.path.islink(uri)


def is_dir(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is a directory (a prefix with objects under it)."""
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if not is_object_uri(uri):
        return os.path.isdir(uri)
    return _info(uri).type == pafs.FileType.Directory


def size(uri: str | os.PathLike) -> int | None:
    """The file's size in bytes, None when there is none."""
    uri = os.fspath(uri)
    if not is_object_uri(uri):
        return os.path.getsize(uri) if os.path.isfile(uri) else None
    info = _info(uri)
    return info.size if info.is_file else None


def list_names(uri: str | os.PathLike) -> list[str]:
    """Names directly inside a directory or prefix (files and sub-directories), sorted; [] when absent."""
    import pyarrow.fs as pafs

    uri = os.fspath(uri)
    if not is_object_uri(uri):
        return sorted(os.listdir(uri)) if os.path.isdir(uri) else []
    fs, path = filesystem(uri)
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def open_input(uri: str | os.PathLike) -> IO[bytes]:
    """A binary file to read ``uri`` from, with random access (objects: ranged reads)."""
    return _open(uri, stream=False)


def open_stream(uri: str | os.PathLike) -> IO[bytes]:
    """A binary file to read ``uri`` from start to end (objects: one buffered ranged GET per 8 MiB)."""
    return _open(uri, stream=True)


def open_url(url: str) -> IO[bytes]:
    """A binary stream of one shard or file: ``s3://`` through :func:`open_stream` (no shell
    involved), local paths, ``pipe:`` commands and ``http(s)://`` through webdataset's ``gopen``."""
    if is_object_uri(url):
        return open_stream(url)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _open(uri: str | os.PathLike, *, stream: bool) -> IO[bytes]:
    uri = os.fspath(uri)
    if not is_object_uri(uri):
        return open(uri, "rb")
    fs, path = filesystem(uri)
    with _errors(uri):
        return fs.open_input_stream(path, buffer_size=_CHUNK) if stream else fs.open_input_file(path)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file."""
    uri = os.fspath(uri)
    with _errors(uri), open_stream(uri) as f:
        return f.read()


def read_range(uri: str | os.PathLike, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` (one ranged GET for an object)."""
    uri = os.fspath(uri)
    with _errors(uri), open_input(uri) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise StorageError(uri, f"expected {length} bytes at offset {offset}, got {len(data)} (file changed?)")
    return data


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(uri: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content appears at ``uri`` only when the block exits cleanly.

    A local parent directory is created; an object is staged in a local temporary file and
    uploaded when the block ends (see the module doc).
    """
    uri = os.fspath(uri)
    if not is_object_uri(uri):
        os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
        with atomic_writer(uri) as f:
            yield f
        return
    with tempfile.TemporaryFile() as staged:
        yield staged
        staged.seek(0)
        upload(staged, uri)


def upload(source: IO[bytes] | str | os.PathLike, uri: str) -> None:
    """Copy a local file (or an open binary file) to the object ``uri``: temporary key, then a
    server-side copy to the final key; the temporary key is removed either way."""
    fs, path = filesystem(uri)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f"{parent}/{temp_path(name).name}" if parent else temp_path(name).name
    with _errors(uri):
        try:
            with contextlib.ExitStack() as stack:
                src = source if hasattr(source, "read") else stack.enter_context(open(source, "rb"))
                with fs.open_output_stream(tmp) as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            fs.move(tmp, path)  # S3: CopyObject, then DeleteObject of the temporary key
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (see :func:`atomic_output`)."""
    with atomic_output(uri) as f:
        f.write(data)


def remove(uri: str | os.PathLike) -> bool:
    """Remove one regular file or object, if present (never a directory, never a link's target);
    returns whether something was removed."""
    uri = os.fspath(uri)
    if not is_object_uri(uri):
        if os.path.isfile(uri) and not os.path.islink(uri):
            os.unlink(uri)
            return True
        return False
    fs, path = filesystem(uri)
    with _errors(uri):
        if not fs.get_file_info(path).is_file:
            return False
        fs.delete_file(path)
    return True


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create the object ``uri`` holding ``data`` only if no object has that key: S3's conditional
    write (``PutObject`` with ``If-None-Match: *``), which the server decides atomically, so of two
    writers exactly one succeeds. Returns False when the key exists.

    pyarrow's filesystem has no conditional write; boto3 (the AWS SDK) makes this one request.
    """
    client, bucket, key = _boto_client(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return False
        raise storage_error(uri, OSError(_boto_cause(exc))) from exc
    except BotoCoreError as exc:
        raise storage_error(uri, OSError(str(exc))) from exc
    return True


def _boto_cause(exc: Any) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    names = {"NoSuchBucket": "NO_SUCH_BUCKET", "AccessDenied": "ACCESS_DENIED",
             "InvalidAccessKeyId": "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch": "SIGNATURE_DOES_NOT_MATCH"}
    return names.get(code, str(exc))


def _boto_client(uri: str) -> tuple[Any, str, str]:
    """``(boto3 S3 client, bucket, key)`` for ``uri``, configured as :func:`filesystem` is."""
    _, path = filesystem(uri)  # checks the URI
    bucket, _, key = path.partition("/")
    if not key:
        raise StorageError(uri, "expected s3://BUCKET/KEY")
    opts = s3_options()
    return _boto(tuple(sorted(opts.items()))), bucket, key


@functools.lru_cache(maxsize=4)
def _boto(options: tuple[tuple[str, Any], ...]) -> Any:
    import boto3
    from botocore.config import Config

    o = dict(options)
    kwargs: dict[str, Any] = {"region_name": o.get("region"),
                              "config": Config(connect_timeout=o["connect_timeout"], read_timeout=o["request_timeout"],
                                               retries={"max_attempts": 3, "mode": "standard"})}
    if "endpoint_override" in o:
        kwargs["endpoint_url"] = f"{o.get('scheme', 'https')}://{o['endpoint_override']}"
    if "access_key" in o:
        kwargs.update(aws_access_key_id=o["access_key"], aws_secret_access_key=o["secret_key"],
                      aws_session_token=o.get("session_token"))
    return boto3.client("s3", **kwargs)


def remove_tree(uri: str | os.PathLike) -> None:
    """Remove an object-storage prefix with everything under it (callers check its marker first;
    a local directory is removed by its owner's own checks, e.g. ``outdir.remove_ray_storage``)."""
    uri = os.fspath(uri)
    if not is_object_uri(uri):
        raise ValueError(f"remove_tree takes an s3:// prefix, not the local path {uri}")
    fs, path = filesystem(uri)
    with _errors(uri):
        fs.delete_dir(path)

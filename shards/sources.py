"""Inputs for stage one: an ImageFolder tree, scikit-learn's digits (plain or cluttered), or WebDataset tars.

Every source yields :class:`Candidate` records in a deterministic, sorted order; the planner
numbers them 0..n-1 in that order. Whether a candidate is really an image is decided later, by
decoding its bytes (``image.decode_image``); undecodable ones are skipped there with a reason.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deitpipe.shards import reader, storage
from deitpipe.shards.cluttered import CANVAS, render_cluttered, upscale_all
from deitpipe.shards.specs import is_tar_spec

# Files whose name says they are not images; anything else (including no extension and image
# extensions that lie about the type) is a candidate and is judged by its content.
NON_IMAGE_EXTENSIONS = frozenset(
    "txt md rst csv tsv json jsonl xml html htm yaml yml toml ini cfg log db sqlite py sh bat "
    "pdf doc docx xls xlsx zip tar gz tgz bz2 xz 7z rar npy npz pkl pickle pt pth mat h5 hdf5 "
    "mp4 avi mov mkv mp3 wav flac lnk url".split()
)
# Member extensions taken as the image of a WebDataset sample, in order of preference.
TAR_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pbm")
DIGITS_COUNT = 1797
# The embedded data sets by name: each has the whole set, ":train" and ":val" (digits_split).
DIGIT_SETS = ("digits", "cluttered-digits")


@dataclass(frozen=True)
class Candidate:
    """One input, before it is numbered or decoded.

    Attributes:
        path: Display path or URI, stored in the sample's metadata.
        label: True class index.
        kind: "file" (read ``ref`` from disk), "digits" (render digit ``ref`` at ``size``),
            "cluttered-digits" (render the cluttered canvas of digit ``ref`` at ``size``),
            "tarmember" (``length`` bytes at ``offset`` of the local tar ``ref``) or "tar"
            (bytes carried in ``data``, for tars read through a stream).
        ref: Filesystem path, digit index, tar path, or ``url#key``.
        size: Render size for (cluttered) digits; 0 otherwise.
        data: In-memory bytes for streamed tar candidates.
        offset, length: Where a "tarmember" image lies in its tar.
    """

    path: str
    label: int
    kind: str = "file"
    ref: str = ""
    size: int = 0
    data: bytes | None = field(default=None, repr=False, compare=False)
    offset: int = 0
    length: int = 0


@dataclass(frozen=True)
class Source:
    """A resolved input source.

    Attributes:
        spec: The specification it was resolved from.
        candidates: Inputs in their sorted order.
        class_names: Class index -> name.
        ignored: Files skipped by name (not images), as display paths.
        skipped: ``(path, reason)`` for entries dropped while listing (e.g. a tar sample lacking cls).
    """

    spec: str
    candidates: list[Candidate]
    class_names: list[str]
    ignored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def is_non_image_name(name: str) -> bool:
    """True for hidden files (``.DS_Store``, ``._x.jpg``) and known non-image extensions."""
    if name.startswith("."):
        return True
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in NON_IMAGE_EXTENSIONS


def list_image_folder(root: str | os.PathLike) -> tuple[list[Candidate], list[str], list[str]]:
    """List an ImageFolder tree ``root/<class>/**/<file>``.

    Symbolic links are followed, but every directory is listed once and every file counts once,
    so link loops end and a linked image is not labelled twice. Folders reached without a link
    are listed first; a link to a folder already listed (a loop, a folder of the tree, another
    class) is ignored. Where several paths reach one file (by real identity: links, hard links),
    the candidate is the one not through a link, then the first by (class, path).

    Args:
        root: Directory whose non-hidden sub-folders are the classes (index = sorted name order).

    Returns:
        ``(candidates sorted by (class, relative path), class_names, ignored)``; ``ignored`` holds
        files judged not images by name (:func:`is_non_image_name`), hidden folders, files
        directly under ``root``, unreadable folders, and the other paths to folders and files
        already listed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} is not a directory")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    ignored = [p.name for p in entries if p not in class_dirs]
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class sub-folders; expected {root}/<class>/<image>")
    found = _walk_classes(class_dirs, ignored)
    candidates, seen = [], set()
    for _, label, rel, identity in sorted(found, key=lambda f: f[:3]):  # not through a link first
        if identity in seen:
            ignored.append(rel)
            continue
        seen.add(identity)
        candidates.append(Candidate(path=rel, label=label, kind="file", ref=str(root / rel)))
    candidates.sort(key=lambda c: (c.label, c.path))
    return candidates, [p.name for p in class_dirs], sorted(ignored)


def _walk_classes(class_dirs: list[Path], ignored: list[str]) -> list[tuple[bool, int, str, tuple[Any, ...]]]:
    """Files under the class folders as ``(through a link, label, rel path, identity)``; appends
    what it skips to ``ignored``. Folders reached without a link go first, so that a link into the
    tree never claims a folder the tree holds; each real folder is listed once."""
    direct = [(label, str(cdir), cdir.name) for label, cdir in reversed(list(enumerate(class_dirs)))]
    linked: collections.deque[tuple[int, str, str]] = collections.deque()
    visited: set[str] = set()
    found: list[tuple[bool, int, str, tuple[Any, ...]]] = []
    while direct or linked:
        through_link = not direct
        label, path, rel = direct.pop() if direct else linked.popleft()
        real = os.path.realpath(path)
        if real in visited:
            ignored.append(rel)
            continue
        visited.add(real)
        try:
            with os.scandir(path) as it:
                children = sorted(it, key=lambda e: e.name)
            dev = os.stat(path).st_dev
        except OSError:
            ignored.append(rel)
            continue
        for entry in children:
            child, link = f"{rel}/{entry.name}", entry.is_symlink()
            if entry.is_dir():  # follows links
                if entry.name.startswith("."):
                    ignored.append(child)
                else:
                    (linked if through_link or link else direct).append((label, entry.path, child))
            elif is_non_image_name(entry.name):
                ignored.append(child)
            else:
                found.append((through_link or link, label, child, _file_identity(entry, dev, link)))
    return found


def _file_identity(entry: os.DirEntry, dev: int, link: bool) -> tuple[Any, ...]:
    """``(st_dev, st_ino)`` of the file an entry reaches; a broken link is its own identity."""
    if not link:
        return dev, entry.inode()  # from the directory listing: no stat per file
    try:
        st = os.stat(entry.path)
    except OSError:
        return ("unreachable", entry.path)  # listed; reading it fails later, with a reason
    return st.st_dev, st.st_ino


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images, d.target  # (1797, 8, 8) float 0..16, (1797,) int


def render_digit(index: int, *, image_size: int = 32) -> bytes:
    """PNG bytes of digit ``index``: 0..16 scaled to 0..255, bicubic upscale, RGB."""
    images, _ = _digits()
    grey = np.clip(np.rint(images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _upscaled_digits() -> np.ndarray:
    return upscale_all(_digits()[0])


def render_cluttered_digit(index: int, *, image_size: int = CANVAS) -> bytes:
    """PNG bytes of cluttered digit ``index`` (:mod:`deitpipe.shards.cluttered`), resized when
    ``image_size`` is not the canvas side (bicubic), RGB."""
    data = render_cluttered(_upscaled_digits(), index)
    if image_size == CANVAS:
        return data
    img = Image.open(io.BytesIO(data)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_named(kind: str, index: int, *, image_size: int) -> bytes:
    """PNG bytes of image ``index`` of the embedded set ``kind`` ("digits" or "cluttered-digits")."""
    if kind == "cluttered-digits":
        return render_cluttered_digit(index, image_size=image_size)
    return render_digit(index, image_size=image_size)


def digits_source(
    *, image_size: int = 32, indices: np.ndarray | None = None, kind: str = "digits"
) -> tuple[list[Candidate], list[str]]:
    """scikit-learn's 1,797 8x8 digits as candidates rendered at ``image_size``.

    Args:
        image_size: Side of the rendered PNGs.
        indices: Subset of digit indices (e.g. one side of :func:`digits_split`); all by default.
        kind: "digits" (the digit alone, scaled to fill the image) or "cluttered-digits" (the
            digit at a random place on a canvas of fragments, :mod:`deitpipe.shards.cluttered`).

    Returns:
        ``(candidates, class_names)``; paths are ``<kind>/000123`` (the digit's index).
    """
    if image_size < 8:
        raise ValueError(f"digits image_size must be >= 8, got {image_size}")
    if kind not in DIGIT_SETS:
        raise ValueError(f"digits kind must be one of {', '.join(DIGIT_SETS)}, got {kind!r}")
    _, target = _digits()
    idx = np.arange(len(target)) if indices is None else np.sort(np.asarray(indices))
    cands = [
        Candidate(path=f"{kind}/{i:06d}", label=int(target[i]), kind=kind, ref=str(i), size=image_size)
        for i in idx
    ]
    return cands, [str(c) for c in range(10)]


def digits_split(*, seed: int = 0, holdout: int = 597) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of the digits (1,200 train / 597 held out by default).

    Args:
        seed: Split seed.
        holdout: Number of held-out images.

    Returns:
        ``(train_indices, holdout_indices)``, each sorted.
    """
    from sklearn.model_selection import train_test_split

    _, target = _digits()
    idx = np.arange(len(target))
    train, held = train_test_split(idx, test_size=holdout, stratify=target, random_state=seed)
    return np.sort(train), np.sort(held)


def digits_image_folder(
    out_dir: str | os.PathLike, *, image_size: int = 32, seed: int = 0, kind: str = "digits"
) -> Path:
    """Write the digits split as ImageFolder trees ``out_dir/train/<0..9>`` and ``out_dir/val/<0..9>``.

    Built in a temporary folder and moved into place; a marker file records a complete build,
    which later calls with the same settings reuse.

    Args:
        out_dir: Destination directory.
        image_size: Side of the rendered PNGs.
        seed: Split seed (:func:`digits_split`).
        kind: "digits" or "cluttered-digits" (:func:`digits_source`).

    Returns:
        ``out_dir``.
    """
    if kind not in DIGIT_SETS:
        raise ValueError(f"digits kind must be one of {', '.join(DIGIT_SETS)}, got {kind!r}")
    out = Path(out_dir)
    marker = out / ".digits-folder.json"
    settings = {"image_size": image_size, "seed": seed, "count": DIGITS_COUNT}
    if kind != "digits":
        settings["kind"] = kind  # a plain digits folder keeps the marker earlier versions wrote
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out
    clash = [p for p in (out / "train", out / "val") if p.exists()]
    if clash and not marker.exists():
        raise ValueError(f"{clash[0]} exists but is not a digits folder; remove it or pick another out_dir")
    tmp = out / f".digits-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _, target = _digits()
    try:
        for split, indices in zip(("train", "val"), digits_split(seed=seed)):
            for i in indices:
                d = tmp / split / str(int(target[i]))
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:06d}.png").write_bytes(render_named(kind, int(i), image_size=image_size))
        marker.unlink(missing_ok=True)
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)  # only a stale build of ours (marker checked)
            os.replace(tmp / split, out / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # also after a failure (a full disk): no half-built tree left
    from deitpipe.shards.manifest import write_json_atomic

    write_json_atomic(marker, settings)
    return out


def _tar_label(sample: dict[str, Any]) -> int | None:
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def list_webdataset(urls: str) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """List samples of existing WebDataset tars that have a ``cls`` and an image member.

    An uncompressed tar on local disk or in object storage (``s3://``) is indexed, not loaded:
    each candidate records where its image lies and is read when it is labelled (a ranged read
    of an object), so tars of any size work. A local tar is indexed by its headers alone; an
    object is streamed once. A compressed tar, or one read through a ``pipe:`` or
    ``http(s)://`` stream, allows no seeking, so its candidates carry their image bytes in
    memory: fine for sets that fit in RAM; copy larger ones to disk or a bucket, uncompressed.

    A key seen before in the same tar is skipped (the first sample with it is kept), so every
    sample found is either a candidate or skipped with a reason.

    Args:
        urls: Brace pattern, path, ``pipe:`` command or ``s3://`` URL (see ``reader.expand_urls``).

    Returns:
        ``(candidates in stored order, skipped (path, reason))``; paths are ``url#key``.

    Raises:
        ValueError: One line naming the tar when one is missing, truncated or corrupt.
    """
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for url in reader.expand_urls(urls):
        local = url.removeprefix("file:")
        if not reader.is_remote(url) and not os.path.isfile(local):
            raise ValueError(f"tar {url} does not exist; check the path or brace pattern")
        in_bucket = storage.is_object_uri(url)
        seekable = (in_bucket or not reader.is_remote(url)) and not _compressed(url if in_bucket else local)
        keys: set[str] = set()
        for sample in _tar_samples(url, local if seekable and not in_bucket else None, index=seekable):
            key = sample["__key__"]
            path = f"{url}#{key}"
            label = _tar_label(sample)
            member = next((m for m in TAR_IMAGE_MEMBERS if m in sample), None)
            if key in keys:
                skipped.append((path, f"duplicate sample key {key} in {url}"))
            elif label is None or label < 0:
                skipped.append((path, "no integer cls member"))
            elif member is None:
                skipped.append((path, f"no image member (one of {', '.join(TAR_IMAGE_MEMBERS)})"))
            elif isinstance(sample[member], tarfile.TarInfo):
                info = sample[member]
                candidates.append(Candidate(path=path, label=label, kind="tarmember", ref=url if in_bucket else local,
                                            offset=info.offset_data, length=info.size))
            else:
                candidates.append(Candidate(path=path, label=label, kind="tar", ref=path, data=sample[member]))
            keys.add(key)
    return candidates, skipped


def _compressed(path: str) -> bool:
    """Whether a file starts with a gzip, bzip2, xz or zstd signature (offsets would not be file offsets)."""
    with storage.open_input(path) as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"))


_META_NAME = re.compile(r"__[^/]*__($|/)")  # names webdataset skips


def _tar_samples(url: str, local: str | None, *, index: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of one tar (:func:`_grouped`), opened by path when ``local`` (an uncompressed tar on
    disk: headers only), else streamed; image members as their ``TarInfo`` when ``local`` or
    ``index`` (an uncompressed object, read back by ranges), else as bytes.

    Raises:
        ValueError: the tar is truncated or corrupt, including where ``tarfile`` would quietly
            stop at a damaged header: a tar must end with its end-of-archive block.
    """
    info_class, last_header = _header_watch()
    try:
        with contextlib.ExitStack() as stack:
            if local is not None:
                tar = stack.enter_context(tarfile.open(local, "r:", tarinfo=info_class))  # seeks over data
            else:
                stream = stack.enter_context(reader.open_stream(url))
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*", tarinfo=info_class))
            yield from _grouped(tar, keep_info=local is not None or index)
            if not isinstance(last_header[0], tarfile.EOFHeaderError):
                why = last_header[0] or "end of data"
                raise tarfile.ReadError(f"{why} at byte {tar.offset} where its end-of-archive block should be")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{url}: not a readable tar (truncated or corrupt): {exc}") from None


def _header_watch() -> tuple[type[tarfile.TarInfo], list[tarfile.HeaderError | None]]:
    """A ``TarInfo`` class for ``tarfile.open(tarinfo=...)`` and the list where it records why
    reading headers stopped: an ``EOFHeaderError`` (a zero block) is the only clean end."""
    last: list[tarfile.HeaderError | None] = [None]

    class _Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                info = super().fromtarfile(tar)
            except tarfile.HeaderError as exc:
                last[0] = exc
                raise
            last[0] = None
            return info

    return _Info, last


def _grouped(tar: tarfile.TarFile, *, keep_info: bool) -> Iterator[dict[str, Any]]:
    """Samples as webdataset groups them (a run of members sharing a key). A member the current
    sample already has starts a new sample with the same key, which the caller skips as a
    duplicate. ``cls`` is bytes; other members are bytes, or their ``TarInfo`` with ``keep_info``."""
    from webdataset.tariterators import base_plus_ext

    sample: dict[str, Any] = {}
    for info in tar:
        tar.members = []  # tarfile keeps every header it reads; a long tar need not (as webdataset does)
        if not info.isfile() or _META_NAME.match(info.name):
            continue
        key, ext = base_plus_ext(info.name)
        if key is None:
            continue
        ext = ext.lower()
        if sample and (sample["__key__"] != key or ext in sample):
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[ext] = info if keep_info and ext != "cls" else tar.extractfile(info).read()
    if sample:
        yield sample


def read_bytes(candidate: Candidate) -> bytes:
    """The raw bytes of a candidate (file content, rendered digit, tar member, or carried bytes)."""
    if candidate.kind == "file":
        with open(candidate.ref, "rb") as f:
            return f.read()
    if candidate.kind in DIGIT_SETS:
        return render_named(candidate.kind, int(candidate.ref), image_size=candidate.size)
    if candidate.kind == "tarmember" and storage.is_object_uri(candidate.ref):
        return storage.read_range(candidate.ref, candidate.offset, candidate.length)
    if candidate.kind == "tarmember":
        with open(candidate.ref, "rb") as f:
            f.seek(candidate.offset)
            data = f.read(candidate.length)
        if len(data) != candidate.length:
            raise OSError(f"truncated: {candidate.ref} ends before its member {candidate.path}")
        return data
    if candidate.kind == "tar" and candidate.data is not None:
        return candidate.data
    raise ValueError(f"candidate {candidate.path}: cannot read bytes of kind {candidate.kind!r}")


def resolve_source(spec: str, *, image_size: int = 32, seed: int = 0) -> Source:
    """Resolve an input specification.

    Args:
        spec: ``digits`` (all 1,797), ``digits:train`` / ``digits:val`` (:func:`digits_split`), the
            same three of ``cluttered-digits``, an ImageFolder directory, or WebDataset tars
            (brace pattern, ``.tar``, ``pipe:``, ``s3://``).
        image_size: Render size for (cluttered) digits.
        seed: Split seed for ``...:train`` / ``...:val``.

    Returns:
        A :class:`Source`.
    """
    kind, _, part = spec.partition(":")
    if kind in DIGIT_SETS and part in ("", "train", "val"):
        indices = None
        if part:
            train, val = digits_split(seed=seed)
            indices = train if part == "train" else val
        cands, names = digits_source(image_size=image_size, indices=indices, kind=kind)
        return Source(spec=spec, candidates=cands, class_names=names)
    if os.path.isdir(spec):
        cands, names, ignored = list_image_folder(spec)
        return Source(spec=spec, candidates=cands, class_names=names, ignored=ignored)
    if is_tar_spec(spec):
        cands, skipped = list_webdataset(spec)
        num_classes = max((c.label for c in cands), default=-1) + 1
        names = [str(i) for i in range(num_classes)]
        return Source(spec=spec, candidates=cands, class_names=names, skipped=skipped)
    raise ValueError(
        f"input {spec!r} is not 'digits', 'cluttered-digits', an existing directory, or WebDataset tars "
        "(a .tar path, a {000..009} brace pattern, pipe:CMD or s3://URL)"
    )

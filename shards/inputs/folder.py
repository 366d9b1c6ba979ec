"""ImageFolder inputs: a directory ``root/<class>/**/<file>``, one class per sub-folder."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

from deitpipe.shards.inputs.base import UNLABELED, Candidate, Input, Source

# Files whose name says they are not images; anything else (including no extension and image
# extensions that lie about the type) is a candidate and is judged by its content.
NON_IMAGE_EXTENSIONS = frozenset(
    "txt md rst csv tsv json jsonl xml html htm yaml yml toml ini cfg log db sqlite py sh bat "
    "pdf doc docx xls xlsx zip tar gz tgz bz2 xz 7z rar npy npz pkl pickle pt pth mat h5 hdf5 "
    "mp4 avi mov mkv mp3 wav flac lnk url".split()
)


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


def list_unlabeled_folder(root: str | os.PathLike) -> tuple[list[Candidate], list[str]]:
    """Every image under ``root``, at any depth, with or without class folders, as unlabelled
    candidates sorted by path; links are followed as :func:`list_image_folder` follows them.

    Returns:
        ``(candidates, ignored)``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} is not a directory")
    ignored: list[str] = []
    found = _walk_classes([root], ignored)
    prefix = root.name + "/"
    candidates, seen = [], set()
    for _, _, rel, identity in sorted(found, key=lambda f: f[:3]):
        rel = rel.removeprefix(prefix)
        if identity in seen:
            ignored.append(rel)
            continue
        seen.add(identity)
        candidates.append(Candidate(path=rel, label=UNLABELED, kind="file", ref=str(root / rel)))
    candidates.sort(key=lambda c: c.path)
    return candidates, sorted(i.removeprefix(prefix) for i in ignored)


def resolve(spec: str, *, image_size: int = 32, seed: int = 0, unlabeled: bool = False) -> Source:
    """The ImageFolder tree ``spec`` as a :class:`Source` (``image_size`` and ``seed`` are unused:
    files are read as they are); with ``unlabeled``, every image under it, without labels."""
    if unlabeled:
        cands, ignored = list_unlabeled_folder(spec)
        return Source(spec=spec, candidates=cands, class_names=[], ignored=ignored)
    cands, names, ignored = list_image_folder(spec)
    return Source(spec=spec, candidates=cands, class_names=names, ignored=ignored)


def read(candidate: Candidate) -> bytes:
    """The file's content."""
    with open(candidate.ref, "rb") as f:
        return f.read()


INPUT = Input(name="folder", accepts=os.path.isdir, resolve=resolve, kinds=("file",), read=read)

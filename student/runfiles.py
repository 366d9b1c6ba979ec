"""A run's files: its checkpoints, its weights and its metrics, written so that a killed run,
a full disk or a cut-off line never costs more than the step in flight, and read so that a
damaged file is named or passed over.

``OUT/checkpoints/epoch-NNNN.pt`` (the local and torchrun launchers) and Ray Train's
``OUT/ray/checkpoint_*/checkpoint.pt`` hold plain ``torch.save`` dicts read with
``weights_only=True``; ``OUT/student.pt`` is a plain state dict timm loads; ``OUT/metrics.jsonl``
is one JSON line per epoch.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from deitpipe.shards import storage
from deitpipe.student.checkpoint import read_state_dict

CHECKPOINT_DIR = "checkpoints"  # the plain checkpoint files of the local and torchrun launchers
CHECKPOINT_FILE = re.compile(r"epoch-([0-9]{4,})\.pt")
RAY_CHECKPOINT = "checkpoint.pt"  # the file inside each of Ray Train's out/ray/checkpoint_* folders


class CheckpointWriteError(OSError):
    """A checkpoint or weights file could not be written; the message is one line naming the file."""


class FileCheckpoints:
    """Checkpoints as plain files, ``out/checkpoints/epoch-NNNN.pt``; the latest ``keep`` stay.

    Args:
        out: the run directory (or ``s3://`` prefix).
        keep: how many of the latest checkpoints to keep.
        rank: only rank 0 writes.
    """

    def __init__(self, out: str | Path, *, keep: int = 2, rank: int = 0) -> None:
        self.out, self.keep, self.rank = os.fspath(out), keep, rank

    def __call__(self, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        if self.rank != 0 or state is None:
            return
        _save(state, storage.join(self.out, CHECKPOINT_DIR, f"epoch-{int(state['epoch']):04d}.pt"))
        for old in checkpoint_files(self.out)[:-self.keep]:
            storage.remove(old)


def checkpoint_files(out: str | Path) -> list[str]:
    """The run's plain checkpoint files (paths or URIs), oldest epoch first."""
    folder = storage.join(out, CHECKPOINT_DIR)
    found = [storage.join(folder, name) for name in storage.list_names(folder) if CHECKPOINT_FILE.fullmatch(name)]
    if not storage.is_object_uri(folder):
        found = [p for p in found if os.path.isfile(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_FILE.fullmatch(p.rsplit("/", 1)[-1])[1]))


def ray_checkpoint_files(out: str | Path) -> list[str]:
    """The checkpoint files in Ray Train's ``out/ray/checkpoint_*`` folders, oldest first."""
    folder = storage.join(out, "ray")
    names = [n for n in storage.list_names(folder) if n.startswith("checkpoint_")]
    return [uri for uri in (storage.join(folder, n, RAY_CHECKPOINT) for n in names) if storage.is_file(uri)]


def latest_checkpoint(out: str | Path) -> dict[str, Any] | None:
    """The newest readable checkpoint state in ``out``, from any launcher: the plain files and Ray
    Train's ``out/ray/checkpoint_*`` folders both count, so a run can resume under another launcher.

    A checkpoint cut off by a lost node (Ray Train copies a worker's folder into its storage file
    by file) does not load; the next newest of its kind is taken instead, so a rerun resumes
    rather than failing on the same file again.
    """
    states = [_newest_readable(checkpoint_files(out)), _newest_readable(ray_checkpoint_files(out))]
    return max((s for s in states if s is not None), key=lambda s: int(s["epoch"]), default=None)


def _newest_readable(paths: list[str]) -> dict[str, Any] | None:
    for path in reversed(paths):
        try:
            state = load_state(path)
        except storage.StorageError:
            raise  # the store is unreachable: not a reason to resume from an older epoch
        except (ValueError, OSError):  # cut off, corrupt or another kind of file: the next older one
            continue
        if "epoch" in state:
            return state
    return None


def load_state(uri: str | Path) -> dict[str, Any]:
    """A checkpoint state from a file (memory-mapped: comparing epochs reads only that number,
    not the weights and optimizer state) or an object (read whole).

    Raises:
        ValueError: one line naming the file, when it is not a torch checkpoint (another kind of
            file, cut off or corrupt) or holds something other than a dict.
        OSError: the file cannot be opened (missing, no permission; an object: StorageError).
    """
    uri = os.fspath(uri)
    if storage.is_object_uri(uri):
        head = storage.read_bytes(uri)
        source, mmap = io.BytesIO(head), False
    else:
        with open(uri, "rb") as f:  # a missing or forbidden file fails here, as itself
            head = f.read(4)
        source, mmap = uri, True
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types (even OSError) for bytes it cannot parse
        raise ValueError(f"{uri} {_unreadable(head, exc)}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{uri} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _unreadable(head: bytes, exc: BaseException) -> str:
    """What a file that torch.load refused is, from its first bytes (torch.save writes a zip)."""
    if not head:
        return "is empty, not a torch checkpoint"
    if not head.startswith(b"PK\x03\x04"):
        return "is not a torch checkpoint: it is not the zip archive torch.save writes"
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if unsafe:
        return (f"is not a checkpoint of tensors and plain values: it holds a {unsafe[1]}, "
                "which is not loaded as it could run code")
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "").split(". ")[0][:120]
    return f"is a cut-off or corrupt torch checkpoint ({type(exc).__name__}{': ' + reason if reason else ''})"


def heads_differ(model: torch.nn.Module, path: str) -> bool:
    """Whether the checkpoint at ``path`` has a head of another shape than ``model``'s."""
    state = read_state_dict(path)
    return "head.weight" in state and state["head.weight"].shape != model.head.weight.shape


def save_weights(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """``torch.save`` to ``path`` (or an object) atomically and durably.

    Raises:
        CheckpointWriteError: one line naming the file and the cause (e.g. no space left).
    """
    _save(weights, os.fspath(path))


def _save(obj: Any, path: str) -> None:
    """``torch.save`` through an atomic output: a failed write leaves nothing under ``path``."""
    try:
        with storage.atomic_output(path) as f:
            torch.save(obj, f)
    except storage.StorageError:
        raise  # already one line naming the object
    except (OSError, RuntimeError) as exc:
        raise CheckpointWriteError(f"cannot write {path}: {_write_failure(exc)}") from exc


def _write_failure(exc: BaseException) -> str:
    """The cause of a failed write in words. torch.save reports a failed write of its file object
    as "enforce fail at inline_container.cc: unexpected pos", with the OSError as its context."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left" in str(e).lower():
            return "no space left on device; free some space or choose another --out"
    root = next((e for e in reversed(chain) if isinstance(e, OSError)), chain[0])
    text = root.strerror if isinstance(root, OSError) and root.strerror else str(root)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(root).__name__)[:200]


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed and fsynced, so a killed run keeps what it logged); an
    object is rewritten whole with the line added.

    A line cut off by a killed write (no newline at the end) is first ended, so it stays a line
    of its own that :func:`read_metrics` skips, and never runs into this record.
    """
    line = json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"
    if storage.is_object_uri(path):
        before = storage.read_bytes(path) if storage.is_file(path) else b""
        storage.write_bytes(path, before + (b"\n" if before and not before.endswith(b"\n") else b"") + line)
        return
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # "a": appended at the end, wherever the read left the position
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a file or an object), in order; empty when it is absent.

    Lines that are not whole JSON objects are skipped: the last line of a run killed while
    writing it, or a line damaged in the middle. They never stop a resume or a report.
    """
    path = os.fspath(path)
    return [record for _, record in _metric_lines(storage.read_bytes(path))] if storage.is_file(path) else []


def _metric_lines(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each intact line of a ``metrics.jsonl``'s bytes."""
    found = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append((line, record))
    return found


def truncate_metrics(path: str, start_epoch: int) -> None:
    """Drop lines of epochs that will be trained again, so a resumed run logs each epoch once;
    lines that are not intact records (:func:`read_metrics`) go too."""
    if not storage.is_file(path):
        return
    data = storage.read_bytes(path)
    keep = [line for line, record in _metric_lines(data)
            if isinstance(record.get("epoch"), int) and record["epoch"] < start_epoch]
    text = "".join(line + "\n" for line in keep).encode("utf-8")
    if text != data:
        storage.write_bytes(path, text)

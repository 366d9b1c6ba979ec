"""Verification of a shard directory against its manifest: hashes, sample counts, stray files.

Stands above the manifest and the reader: ``verify_shards`` reads the manifest, hashes each
listed shard and counts its samples, and with ``deep`` decodes every sample as the reader does.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.manifest import ManifestError, read_manifest
from deitpipe.shards.format.reader import decode_sample, iter_tar_samples
from deitpipe.shards.storage import file_sha256


def count_tar_samples(path: str | os.PathLike) -> int:
    """Number of samples (runs of members sharing a key) in a shard, without decoding."""
    count, last = 0, None
    with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            key = info.name.split("/")[-1].split(".", 1)[0]
            if info.isreg() and key != last:
                count, last = count + 1, key
    return count


def find_stray_files(out_dir: str | os.PathLike, listed: set[str] | None = None) -> list[str]:
    """Warnings about leftover temporary files and tars the manifest does not list.

    Args:
        out_dir: Shard directory.
        listed: Shard names in the manifest (None: read it).

    Returns:
        One line per stray file; these are warnings, not errors.
    """
    if listed is None:
        listed = {s["name"] for s in read_manifest(out_dir)["shards"]}
    out = []
    for name in storage.list_names(out_dir):
        p = storage.join(out_dir, name)
        if ".tmp-" in name:
            out.append(f"{p}: leftover temporary file from an interrupted write; safe to delete")
        elif name.endswith(".tar") and name not in listed:
            out.append(f"{p}: tar not listed in {schema.MANIFEST_NAME}; readers of the manifest ignore it")
    return out


def _check_shard(path: str, entry: dict[str, Any], *, deep: bool, views: int | None) -> list[str]:
    if not storage.is_file(path):
        return [f"{path}: listed in {schema.MANIFEST_NAME} but missing"]
    problems = []
    sha = file_sha256(path)
    if entry.get("sha256") and sha != entry["sha256"]:
        problems.append(f"{path}: sha256 {sha[:12]}... != manifest {str(entry['sha256'])[:12]}...")
    try:
        count = count_tar_samples(path)
        if deep:
            for raw in iter_tar_samples(path):
                sample = decode_sample(raw)
                if views is not None and sample["box"].shape != (views + 1, 4):
                    shape = sample["box"].shape
                    problems.append(f"{path}: {sample['key']} box shape {shape} != ({views + 1}, 4)")
                    break
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        return problems + [f"{path}: unreadable ({exc})"]
    if count != entry.get("samples"):
        problems.append(f"{path}: {count} samples, manifest says {entry.get('samples')}")
    return problems


def verify_shards(out_dir: str | os.PathLike, *, deep: bool = False) -> list[str]:
    """Check a shard directory against its manifest.

    Each listed shard must exist, hash to its ``sha256`` and hold ``samples`` samples;
    ``first_index`` values must be contiguous. Leftover temporary files are not errors: see
    :func:`find_stray_files`.

    Args:
        out_dir: Shard directory.
        deep: Also decode every sample and check the per-view shapes against ``views``.

    Returns:
        Problems, one line each; empty when the shard set is intact.
    """
    try:
        manifest = read_manifest(out_dir)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    names = [s.get("name") for s in manifest["shards"]]
    if len(set(names)) != len(names):
        problems.append(f"{out_dir}: {schema.MANIFEST_NAME} lists a shard twice")
    next_index = 0
    for entry in manifest["shards"]:
        path = storage.join(out_dir, str(entry.get("name")))
        problems += _check_shard(path, entry, deep=deep, views=manifest.get("views"))
        first = entry.get("first_index")
        if first is not None and first != next_index:
            problems.append(f"{path}: first_index {first}, expected {next_index} (shards must be contiguous)")
        # A shard covers "candidates" planned inputs; undecodable ones are skipped, not stored.
        next_index += int(entry.get("candidates", entry.get("samples")) or 0)
    return problems

"""Inputs and outputs as users name them: local paths, URLs, ``pipe:`` commands, named data sets."""

from __future__ import annotations

import os
import re

from deitpipe.shards.format.schema import MANIFEST_NAME

# Inputs named by the data set rather than by a path.
NAMED_DATA = frozenset(f"{name}{part}" for name in ("digits", "cluttered-digits") for part in ("", ":train", ":val"))
# The few-label splits of the embedded sets: K labelled images a class, and the rest of :train.
_FEW_LABELS = re.compile(r"(digits|cluttered-digits):(labeled|unlabeled)-[1-9][0-9]*")


def is_named_data(spec: str) -> bool:
    """Whether ``spec`` names an embedded set (``digits``, ``cluttered-digits:train``, ...,
    ``cluttered-digits:labeled-10``, ``digits:unlabeled-10``)."""
    return spec in NAMED_DATA or bool(_FEW_LABELS.fullmatch(spec))


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL or a ``pipe:`` command rather than a local path."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://") or text.startswith("pipe:")


def absolute_spec(spec: str | None) -> str | None:
    """A path the user gave, as every process of every node reads it.

    Ray workers do not run in the driver's working directory, so a relative local path is made
    absolute on the driver, before any worker sees it. URLs (``s3://``, ``http(s)://``),
    ``pipe:`` commands and named data sets (``digits``) pass through unchanged; a ``::`` list is
    resolved item by item; a brace pattern is resolved as a path.
    """
    if spec is None or is_named_data(spec) or is_remote(spec):
        return spec
    if "::" in spec:
        return "::".join(absolute_spec(part) for part in spec.split("::"))
    return os.path.abspath(os.path.expanduser(spec))


def is_tar_spec(spec: str) -> bool:
    """Whether ``spec`` names WebDataset tars: a ``.tar`` path or URL, a ``{a..b}`` brace pattern,
    a ``::`` list, or a ``pipe:`` command or object-store URL."""
    return ("{" in spec or spec.endswith(".tar") or "::" in spec
            or spec.startswith(("pipe:", "s3://", "http://", "https://")))


def is_shard_set(spec: str) -> bool:
    """Whether ``spec`` names label-teacher shards: a directory holding its manifest, or tars."""
    return (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, MANIFEST_NAME))) or is_tar_spec(spec)

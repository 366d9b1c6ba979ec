"""What every kind of input yields, and the small interface each kind implements.

A source lists :class:`Candidate` records in a deterministic, sorted order; the planner numbers
them 0..n-1 in that order. Whether a candidate is really an image is decided later, by decoding
its bytes (``image.decode_image``); undecodable ones are skipped there with a reason.

Each kind of input is one module of this package (``folder``, ``tars``, ``embedded``) that
defines an :class:`Input`: which specifications name it, how they resolve to a :class:`Source`,
and how one of its candidates is read. ``factory.resolve_source`` picks the input by the form of
the specification, ``factory.read_bytes`` by the candidate's ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field



from deitpipe.shards.format.schema import UNLABELED  # noqa: F401 - an input without a true label (re-exported)


@dataclass(frozen=True)
class Candidate:
    """One input, before it is numbered or decoded.

    Attributes:
        path: Display path or URI, stored in the sample's metadata.
        label: True class index, or ``UNLABELED`` (-1) for an input without one.
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
        class_names: Class index -> name (empty where no input carries a label).
        ignored: Files skipped by name (not images), as display paths.
        skipped: ``(path, reason)`` for entries dropped while listing (e.g. a tar sample lacking cls).
    """

    spec: str
    candidates: list[Candidate]
    class_names: list[str]
    ignored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Input:
    """One kind of input.

    Attributes:
        name: Its name in messages, e.g. "folder".
        accepts: Whether a specification names this kind of input.
        resolve: ``resolve(spec, *, image_size, seed, unlabeled) -> Source`` for a specification it
            accepts; with ``unlabeled`` every candidate's label is ``UNLABELED``, and inputs that
            carry no label are listed rather than skipped.
        kinds: The ``Candidate.kind`` values its sources list.
        read: The raw bytes of one of its candidates.
    """

    name: str
    accepts: Callable[[str], bool]
    resolve: Callable[..., Source]
    kinds: tuple[str, ...]
    read: Callable[[Candidate], bytes]

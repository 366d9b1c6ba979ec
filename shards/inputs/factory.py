"""Choosing the input for a specification, and reading any candidate's bytes.

As timm's ``reader_factory`` picks a reader by name, :func:`resolve_source` picks the first
:class:`~deitpipe.shards.inputs.base.Input` in :data:`INPUTS` that accepts the specification's
form, and :func:`read_bytes` the one whose candidates are of the candidate's ``kind``.
"""

from __future__ import annotations

from deitpipe.shards.inputs import embedded, folder, tars
from deitpipe.shards.inputs.base import Candidate, Input, Source

# In order of precedence: a named set before a directory of that name, a directory before tars.
INPUTS: tuple[Input, ...] = (embedded.INPUT, folder.INPUT, tars.INPUT)
_BY_KIND = {kind: i for i in INPUTS for kind in i.kinds}


def resolve_source(spec: str, *, image_size: int = 32, seed: int = 0, unlabeled: bool = False) -> Source:
    """Resolve an input specification.

    Args:
        spec: ``digits`` (all 1,797), ``digits:train`` / ``digits:val`` (``embedded.digits_split``),
            the same three of ``cluttered-digits``, an ImageFolder directory, or WebDataset tars
            (brace pattern, ``.tar``, ``pipe:``, ``s3://``).
        image_size: Render size for (cluttered) digits.
        seed: Split seed for ``...:train`` / ``...:val``.
        unlabeled: drop every true label (``base.UNLABELED``): a folder is listed recursively,
            with or without class folders, and tars need no ``cls`` member.

    Returns:
        A :class:`Source`.
    """
    for kind in INPUTS:
        if kind.accepts(spec):
            return kind.resolve(spec, image_size=image_size, seed=seed, unlabeled=unlabeled)
    raise ValueError(
        f"input {spec!r} is not 'digits', 'cluttered-digits', an existing directory, or WebDataset tars "
        "(a .tar path, a {000..009} brace pattern, pipe:CMD or s3://URL)"
    )


def read_bytes(candidate: Candidate) -> bytes:
    """The raw bytes of a candidate (file content, rendered digit, tar member, or carried bytes)."""
    kind = _BY_KIND.get(candidate.kind)
    if kind is None:
        raise ValueError(f"candidate {candidate.path}: cannot read bytes of kind {candidate.kind!r}")
    return kind.read(candidate)

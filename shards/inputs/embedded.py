"""The embedded data sets: scikit-learn's 1,797 digits, plain or cluttered, rendered on demand.

A specification names one by its name (``digits``, ``cluttered-digits``), whole or one side of
its split (``:train``, ``:val``), or a few-label split of ``:train``: ``:labeled-K`` keeps K
images a class with their labels, ``:unlabeled-K`` is the rest of ``:train`` without labels
(:func:`few_labels_split`). ``:val`` is untouched by either. No file is read or downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from deitpipe.shards.inputs.base import UNLABELED, Candidate, Input, Source
from deitpipe.shards.inputs.cluttered import CANVAS, CLUTTER_SEED, render_cluttered, upscale_all
from deitpipe.shards.specs import is_named_data

DIGITS_COUNT = 1797
# The embedded data sets by name: each has the whole set, ":train" and ":val" (digits_split).
DIGIT_SETS = ("digits", "cluttered-digits")


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


def render_cluttered_digit(index: int, *, image_size: int = CANVAS, clutter_seed: int = CLUTTER_SEED) -> bytes:
    """PNG bytes of cluttered digit ``index`` (:mod:`deitpipe.shards.inputs.cluttered`), resized
    when ``image_size`` is not the canvas side (bicubic), RGB. ``clutter_seed`` other than the
    named set's places the same digit elsewhere among other fragments."""
    data = render_cluttered(_upscaled_digits(), index, seed=clutter_seed)
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
            digit at a random place on a canvas of fragments, :mod:`.cluttered`).

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


def few_labels_split(k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``:train`` cut into K images a class that keep their labels and the rest.

    The K of each class are a fixed draw (seeded by the class, not by ``seed``, which chooses
    the train/val split only), so ``labeled-K`` and ``unlabeled-K`` of one K never overlap and
    together are ``:train``, and ``labeled-5`` is part of ``labeled-10``.

    Returns:
        ``(labelled indices, unlabelled indices)``, each sorted.
    """
    train, _ = digits_split(seed=seed)
    _, target = _digits()
    keep = []
    for c in range(10):
        members = train[target[train] == c]
        if k > len(members):
            raise ValueError(f"labeled-{k}: class {c} has only {len(members)} training images")
        keep.append(np.random.default_rng(1000 + c).permutation(members)[:k])
    labelled = np.sort(np.concatenate(keep))
    return labelled, np.setdiff1d(train, labelled)


def digits_image_folder(
    out_dir: str | os.PathLike, *, image_size: int = 32, seed: int = 0, kind: str = "digits", val_renders: int = 1
) -> Path:
    """Write the digits split as ImageFolder trees ``out_dir/train/<0..9>`` and ``out_dir/val/<0..9>``.

    Built in a temporary folder and moved into place; a marker file records a complete build,
    which later calls with the same settings reuse.

    Args:
        out_dir: Destination directory.
        image_size: Side of the rendered PNGs.
        seed: Split seed (:func:`digits_split`).
        kind: "digits" or "cluttered-digits" (:func:`digits_source`).
        val_renders: cluttered digits only: each held-out digit rendered under this many clutter
            seeds (``NNNNNN.png`` under the named set's, ``NNNNNN-cS.png`` under seed S), a
            held-out set that many times larger and never a training digit.

    Returns:
        ``out_dir``.
    """
    if kind not in DIGIT_SETS:
        raise ValueError(f"digits kind must be one of {', '.join(DIGIT_SETS)}, got {kind!r}")
    if val_renders < 1 or (val_renders > 1 and kind != "cluttered-digits"):
        raise ValueError(f"val_renders must be 1, or more for cluttered-digits (plain digits render one way), "
                         f"got {val_renders} for {kind}")
    out = Path(out_dir)
    marker = out / ".digits-folder.json"
    settings = {"image_size": image_size, "seed": seed, "count": DIGITS_COUNT}
    if kind != "digits":
        settings["kind"] = kind  # a plain digits folder keeps the marker earlier versions wrote
    if val_renders > 1:
        settings["val_renders"] = val_renders
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
                for s in range(1, val_renders if split == "val" else 1):
                    (d / f"{i:06d}-c{s}.png").write_bytes(render_cluttered_digit(
                        int(i), image_size=image_size, clutter_seed=CLUTTER_SEED + s))
        marker.unlink(missing_ok=True)
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)  # only a stale build of ours (marker checked)
            os.replace(tmp / split, out / split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # also after a failure (a full disk): no half-built tree left
    from deitpipe.shards.format.manifest import write_json_atomic

    write_json_atomic(marker, settings)
    return out


def accepts(spec: str) -> bool:
    """Whether ``spec`` names an embedded set: ``digits``, ``cluttered-digits``, each with an
    optional ``:train``, ``:val``, ``:labeled-K`` or ``:unlabeled-K``."""
    return is_named_data(spec)


def resolve(spec: str, *, image_size: int = 32, seed: int = 0, unlabeled: bool = False) -> Source:
    """The embedded set ``spec`` rendered at ``image_size``; ``seed`` chooses the split. The
    images of ``:unlabeled-K``, and of any set with ``unlabeled``, carry no label."""
    kind, _, part = spec.partition(":")
    indices = None
    if part in ("train", "val"):
        train, val = digits_split(seed=seed)
        indices = train if part == "train" else val
    elif part:
        which, _, k = part.partition("-")
        labelled, rest = few_labels_split(int(k), seed=seed)
        indices = labelled if which == "labeled" else rest
        unlabeled = unlabeled or which == "unlabeled"
    cands, names = digits_source(image_size=image_size, indices=indices, kind=kind)
    if unlabeled:
        cands = [dataclasses.replace(c, label=UNLABELED) for c in cands]
    return Source(spec=spec, candidates=cands, class_names=names)


def read(candidate: Candidate) -> bytes:
    """The rendered PNG of the candidate's image."""
    return render_named(candidate.kind, int(candidate.ref), image_size=candidate.size)


INPUT = Input(name="embedded", accepts=accepts, resolve=resolve, kinds=DIGIT_SETS, read=read)

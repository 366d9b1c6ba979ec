"""Cluttered, translated digits: scikit-learn's digits placed at random on a canvas of fragments.

In the manner of cluttered MNIST (Mnih et al. 2014; Jaderberg et al. 2015): each 8x8 digit is
scaled up and pasted at a random position on a larger black canvas strewn with square fragments
cut from other digits. A convnet's translation equivariance suits this task; a small ViT must
learn where to look from 1,200 images, so a convnet teacher has something to hand on.

Everything here is a pure function of the digit arrays, the image index and a seed: image ``i``
is the same on every machine, in every split, and whichever command renders it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CANVAS = 32  # side of the canvas, px
DIGIT = 16  # side of the pasted digit (the 8x8 source scaled 2x), px
FRAGMENTS = 4  # fragments of other digits per canvas (as cluttered MNIST on 60 px)
FRAGMENT = 5  # side of a fragment cut from a DIGIT-px digit (cluttered MNIST: 8 of 28 px)
CLUTTER_SEED = 0  # the named data set's seed


def upscale(digit: np.ndarray, size: int = DIGIT) -> np.ndarray:
    """One 8x8 digit (0..16) as uint8 (0..255) at ``size`` x ``size``, bicubic."""
    grey = np.clip(np.rint(digit * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC))


def upscale_all(images: np.ndarray) -> np.ndarray:
    """``(n, 8, 8)`` digits as ``(n, DIGIT, DIGIT)`` uint8 (:func:`upscale` of each)."""
    return np.stack([upscale(d) for d in images])


def cluttered_canvas(digits: np.ndarray, index: int, *, seed: int = CLUTTER_SEED) -> tuple[np.ndarray, tuple]:
    """Canvas ``index``: digit ``digits[index]`` at a random place among fragments of others.

    Fragments come from digits other than ``index``, drawn from all of ``digits``; each is a
    random ``FRAGMENT``-px square of that digit. Pixels combine by maximum (white on black).

    Args:
        digits: ``(n, DIGIT, DIGIT)`` uint8 digits (:func:`upscale_all` of ``load_digits().images``).
        index: which digit the canvas shows (its label is that digit's).
        seed: construction seed; the draws for one canvas come from ``(seed, index)``.

    Returns:
        ``(canvas, box)``: uint8 ``(CANVAS, CANVAS)`` and the digit's ``(left, top, right, bottom)``.
    """
    rng = np.random.default_rng([seed, index])
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    donors = rng.integers(0, len(digits) - 1, size=FRAGMENTS)
    donors = donors + (donors >= index)  # any digit but this one
    for donor in donors:
        sy, sx = rng.integers(0, DIGIT - FRAGMENT + 1, size=2)
        y, x = rng.integers(0, CANVAS - FRAGMENT + 1, size=2)
        piece = digits[donor][sy:sy + FRAGMENT, sx:sx + FRAGMENT]
        np.maximum(canvas[y:y + FRAGMENT, x:x + FRAGMENT], piece, out=canvas[y:y + FRAGMENT, x:x + FRAGMENT])
    top, left = (int(v) for v in rng.integers(0, CANVAS - DIGIT + 1, size=2))
    region = canvas[top:top + DIGIT, left:left + DIGIT]
    np.maximum(region, digits[index], out=region)
    return canvas, (left, top, left + DIGIT, top + DIGIT)


def render_cluttered(digits: np.ndarray, index: int, *, seed: int = CLUTTER_SEED) -> bytes:
    """PNG bytes (RGB) of :func:`cluttered_canvas`."""
    canvas, _ = cluttered_canvas(digits, index, seed=seed)
    buf = io.BytesIO()
    Image.fromarray(canvas).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()

"""Pillow's affine transform filters (``Image.transform(AFFINE)``, bicubic a = -1 and bilinear) on
a uint8 batch: the geometric half of the batched RandAugment (:mod:`.randaugment`).

A sample's maps run from output to input pixel coordinates, in float64 as Pillow's; the
interpolation is float32 in Pillow's Horner form, truncated; a point whose source lies outside
the image takes the fill colour. Where every map keeps rows (ShearX, TranslateX) or columns, the
sampling runs along that axis alone: the other axis's weight is exactly 0 there, so the bytes are
those of the two-dimensional sampling, with a quarter of the taps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def affine_sample(images: torch.Tensor, chain: list[torch.Tensor], *, fill: Sequence[int],
                  interpolation: str = "bicubic", along: str | None = None) -> torch.Tensor:
    """Sample (B, C, H, W) uint8 ``images`` through ``chain``, (B, 3, 3) float64 maps from output
    to input coordinates applied last first, Pillow's way.

    Args:
        fill: one value a channel for points whose source is outside the image.
        interpolation: "bicubic" or "bilinear".
        along: "x" where every map keeps y (:func:`kept_axis`; the y arithmetic and checks are
            skipped: y stays on the pixel centres), "y" likewise, None for both axes.
    Returns:
        (B, C, H, W) uint8.
    """
    b, c, h, w = images.shape
    x, y = (v.expand(b, -1) for v in _pixel_centres(h, w, images.device))  # (B, HW) float64
    inside = None
    for m in reversed(chain):
        m = m[:, :, :, None]
        x, y = (x if along == "y" else m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2],
                y if along == "x" else m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2])
        for v, size, kept in ((x, w, along == "y"), (y, h, along == "x")):
            if not kept:
                ok = (v >= 0).logical_and_(v < size)
                inside = ok if inside is None else inside.logical_and_(ok)
    sample = _bicubic if interpolation == "bicubic" else _bilinear
    out = sample(images.flatten(2), x - 0.5, y - 0.5, h, w, along=along)  # (B, C, HW) float32
    if inside is not None:
        outside = inside.logical_not_()
        for channel, value in enumerate(fill):
            out[:, channel].masked_fill_(outside, value)
    return out.view(b, c, h, w).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, HW) float64 x and y of every pixel's centre, Pillow's coordinates."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float64) + 0.5,
                            torch.arange(width, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    return xs.reshape(1, -1), ys.reshape(1, -1)


def kept_axis(maps: list[torch.Tensor]) -> str | None:
    """"x" when every (1, 3, 3) map of one sample keeps each output row's y (its second row is
    (0, 1, 0)), "y" when every map keeps x, else None."""
    rows = all(m[0, 1].tolist() == [0.0, 1.0, 0.0] for m in maps)
    cols = all(m[0, 0].tolist() == [1.0, 0.0, 0.0] for m in maps)
    return "x" if rows else "y" if cols else None


def _axis(pos: torch.Tensor, size: int, offsets: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(B, N) float64 positions -> their fractions (B, 1, N) float32 and, for each offset, the
    index of that tap from the floor, repeated at the edges: (B, N) int64."""
    base = torch.floor(pos)
    frac = (pos - base).float()[:, None]
    base = base.long()
    return frac, [(base + k).clamp_(0, size - 1) for k in offsets]


def _taps(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat (B, C, HW) uint8 values at (B, N) flat indices -> (B, C, N) float32 (gathered as
    bytes: an eighth of the memory traffic of gathering doubles)."""
    return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1)).float()


def _bicubic(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, height: int, width: int, *,
             along: str | None = None) -> torch.Tensor:
    """Pillow's bicubic transform filter (a = -1, edge pixels repeated, truncated to an integer)
    at (B, N) float64 positions in pixel-centre coordinates; flat is (B, C, HW) uint8. The
    positions are float64 as Pillow's; the interpolation is float32, which moves a truncation
    across an integer for about one value in 10^3 to 10^4. ``along`` "x" (every y on a pixel
    centre) or "y" (every x) interpolates along that axis alone: the same values (the other
    weight is 0, and ``v + 0 * t == v``), a quarter of the taps."""
    four = (-1, 0, 1, 2)
    dx, cols = _axis(x, width, (0,) if along == "y" else four)
    dy, rows = _axis(y, height, (0,) if along == "x" else four)
    rows = [r * width for r in rows]
    if along == "x":
        out = _cubic(*[_taps(flat, rows[0] + c) for c in cols], dx)
    elif along == "y":
        out = _cubic(*[_taps(flat, r + cols[0]) for r in rows], dy)
    else:
        out = _cubic(*[_cubic(*[_taps(flat, r + c) for c in cols], dx) for r in rows], dy)
    return out.trunc_().clamp_(0, 255)


def _cubic(v1, v2, v3, v4, d):
    # Pillow's Horner form, v2 + d (p2 + d (p3 + d p4)): exact on flat regions, where a weighted
    # sum would round down. In place on three temporaries: the same operations in the same order
    # (IEEE + and * commute), a third of the allocations.
    p2, p3, p4 = v3 - v1, (v1 - v2).mul_(2).add_(v3).sub_(v4), (v2 - v1).sub_(v3).add_(v4)
    return p4.mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)


def _bilinear(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, height: int, width: int, *,
              along: str | None = None) -> torch.Tensor:
    """Pillow's bilinear transform filter (edge pixels repeated, truncated) at (B, N) positions;
    ``along`` as :func:`_bicubic`'s."""
    dx, cols = _axis(x, width, (0,) if along == "y" else (0, 1))
    dy, rows = _axis(y, height, (0,) if along == "x" else (0, 1))
    rows = [r * width for r in rows]

    def lerp(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return a + (b - a) * d

    if along == "x":
        out = lerp(*(_taps(flat, rows[0] + c) for c in cols), dx)
    elif along == "y":
        out = lerp(*(_taps(flat, r + cols[0]) for r in rows), dy)
    else:
        out = lerp(*(lerp(*(_taps(flat, r + c) for c in cols), dx) for r in rows), dy)
    return out.trunc_().clamp_(0, 255)


__all__ = ["affine_sample", "kept_axis"]

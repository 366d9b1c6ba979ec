"""DeiT's per-image augmentation on a whole batch at once: RandAugment, normalisation, erasing.

The same recipe as the student's ``Augment`` (timm's ``rand-m9-mstd0.5-inc1`` RandAugment, then
ToDtype + Normalize, then torchvision's RandomErasing with per-pixel noise), but every draw is a
per-sample tensor and every op runs on the whole (B, 3, H, W) batch on its device, so nothing
loops over the samples:

- the ops that map each value through a table (AutoContrast, Equalize, Invert, Posterize,
  Solarize, SolarizeAdd, Contrast, Brightness) become one (B, 3, 256) table per op layer and one
  ``gather``; Equalize and AutoContrast read per-sample, per-channel histograms made with one
  ``bincount`` over offset values;
- Color and Sharpness are per-pixel blends with a per-sample factor;
- the geometric ops (Rotate, ShearX/Y, TranslateX/YRel) are affine maps, composed per sample and
  sampled once with Pillow's bicubic kernel (a = -1) and its fill rule (a point whose source lies
  outside the image takes the fill colour).

Each op reproduces the Pillow op timm calls: the table and blend ops value for value; a
geometric op maps coordinates in float64 as Pillow does and interpolates in float32, which puts
about one value in 10^3 one level off. Two geometric ops in a row are sampled once through
their composed map instead of twice, which differs from Pillow's double resampling by
interpolation noise; a colour op between them keeps the order (the pending map is applied
first). PosterizeIncreasing at level 10 keeps 0 bits (a black image), as timm meant and Pillow
up to 12 did; Pillow 13 raises there. On CUDA every op is computed for the whole batch and
``torch.where`` keeps it where a sample chose it: wasted arithmetic, but no wait for the device.
On a CPU each op runs for the samples that chose it only, in place on one copy of the batch: the
warp a sample at a time (its temporaries stay in cache), along one axis where the maps keep rows
or columns; the tables as byte lookups (numpy's ``take``), the histograms a channel at a time.
Both ways give the same bytes (tests compare them).

Draws come from a ``torch.Generator`` on the images' device, seeded from (seed, epoch, rank, step)
by :func:`augment_generator`, so a run replays exactly on the same kind of device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_choices

from deitpipe.shards.format.image import IMAGENET_MEAN, IMAGENET_STD
from deitpipe.shards.format.warp import affine_sample, kept_axis

LEVELS = 10.0  # timm's _LEVEL_DENOM: levels are in 0..10
TRANSLATE_PCT = 0.45  # timm's default translate_pct for TranslateX/YRel
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TABLE_OPS = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
             "SolarizeAdd", "ContrastIncreasing", "BrightnessIncreasing")
BLEND_OPS = ("ColorIncreasing", "SharpnessIncreasing")
_GENERATOR_TAG = 0xA11C  # separates these draws from any other stream seeded from the same run


def augment_generator(*, seed: int, epoch: int, rank: int, step: int,
                      device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` for one batch's augmentation draws.

    Args:
        seed, epoch, rank, step: the batch's place in the run; equal arguments give equal draws
            on the same kind of device (CPU and CUDA generators are different streams).
        device: where the draws are made (the images' device).
    Returns:
        A seeded ``torch.Generator``.
    """
    state = np.random.SeedSequence([seed, epoch, rank, step, _GENERATOR_TAG]).generate_state(2)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


@dataclass(frozen=True)
class RandAugmentParams:
    """Per-sample draws of one batch's RandAugment, each (B, num_ops).

    Attributes:
        op: index into ``BatchRandAugment.ops``.
        applied: whether the drawn op is applied (probability p each).
        level: the op's level in [0, 10] (float64).
        negate: the random sign of the signed ops (True: the argument is negated).
    """

    op: torch.Tensor
    applied: torch.Tensor
    level: torch.Tensor
    negate: torch.Tensor

    @classmethod
    def forced(cls, ops: Sequence[str], names: Sequence[str], *, level: float | Sequence[float],
               negate: bool | Sequence[bool] = False, device: torch.device | str = "cpu") -> RandAugmentParams:
        """Parameters that apply ``names[i]`` to sample i (one op each), for tests and inspection.

        Args:
            ops: the op set (``BatchRandAugment.ops``).
            names: one op name per sample.
            level: one level for all, or one per sample.
            negate: one sign for all, or one per sample.
        """
        n = len(names)
        level = [float(level)] * n if isinstance(level, (int, float)) else [float(v) for v in level]
        negate = [bool(negate)] * n if isinstance(negate, bool) else [bool(v) for v in negate]
        return cls(op=torch.tensor([[ops.index(x)] for x in names], device=device),
                   applied=torch.ones(n, 1, dtype=torch.bool, device=device),
                   level=torch.tensor(level, dtype=torch.float64, device=device)[:, None],
                   negate=torch.tensor(negate, device=device)[:, None])


class BatchRandAugment:
    """timm's RandAugment (``rand_augment_ops`` over the increasing op set) on a uint8 batch.

    Args:
        num_ops: ops drawn per image, uniformly with replacement (2 in DeiT).
        magnitude: mean level 0..10 (9 in DeiT).
        magnitude_std: the level's standard deviation per op (0.5 in DeiT; inf: uniform in
            [0, magnitude], as timm).
        p: probability that a drawn op is applied (0.5 in timm).
        mean: fill colour of the geometric ops, as fractions (timm fills with the mean, rounded).
        interpolation: of the geometric ops, "bicubic" (DeiT) or "bilinear", Pillow's kernels.
        ops: the op set; default timm's ``rand_augment_choices("", increasing=True)``.
    """

    def __init__(self, *, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 p: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN, interpolation: str = "bicubic",
                 ops: Sequence[str] | None = None) -> None:
        self.ops = tuple(ops or rand_augment_choices("", increasing=True))
        unknown = [x for x in self.ops if x not in GEOMETRIC + TABLE_OPS + BLEND_OPS]
        if unknown:
            raise ValueError(f"RandAugment ops {unknown} have no batched implementation")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"RandAugment interpolation must be bicubic or bilinear, got {interpolation!r}")
        if not 0 <= magnitude <= LEVELS or magnitude_std < 0 or not 0 <= p <= 1 or num_ops < 1:
            raise ValueError(f"RandAugment needs a level in [0, 10], magnitude_std >= 0, p in [0, 1] and "
                             f"num_ops >= 1, got {magnitude}, {magnitude_std}, {p}, {num_ops}")
        self.num_ops, self.magnitude, self.magnitude_std, self.p = num_ops, float(magnitude), float(magnitude_std), p
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # as student.data.RandAugment
        self.interpolation = interpolation

    def draw(self, batch: int, *, generator: torch.Generator) -> RandAugmentParams:
        """Draw every sample's ops, application, level and sign from ``generator``."""
        dev, shape = generator.device, (batch, self.num_ops)
        op = torch.randint(len(self.ops), shape, generator=generator, device=dev)
        applied = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64) <= self.p
        noise = torch.randn(shape, generator=generator, device=dev, dtype=torch.float64)
        if math.isinf(self.magnitude_std):
            level = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64) * self.magnitude
        else:
            level = self.magnitude + self.magnitude_std * noise
        negate = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64) > 0.5
        return RandAugmentParams(op=op, applied=applied, level=level.clamp(0.0, LEVELS), negate=negate)

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, H, W) uint8, drawing from ``generator``."""
        return self.apply(images, self.draw(images.shape[0], generator=generator))

    def apply(self, images: torch.Tensor, params: RandAugmentParams) -> torch.Tensor:
        """Apply drawn (or forced) parameters: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8.

        Layers run in order. Geometric maps accumulate per sample and are sampled when a colour
        op of that sample comes next, and once at the end.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchRandAugment expects (B, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        if images.device.type != "cuda":
            images = images.clone()  # off CUDA the layers write the samples they change in place
        chain: list[torch.Tensor] = []  # pending (B, 3, 3) maps, output -> input, in op order
        pending = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for layer in range(params.op.shape[1]):
            names = params.op[:, layer]
            applied, level, negate = params.applied[:, layer], params.level[:, layer], params.negate[:, layer]
            is_geo = _member(names, [self.ops.index(x) for x in GEOMETRIC if x in self.ops]) & applied
            colour = applied & ~is_geo
            flush = pending & colour
            if chain and _maybe_any(flush):
                images = self._warp_where(images, chain, flush)
            chain = [torch.where(flush[:, None, None], _eye(images), m) for m in chain]
            pending = pending & ~flush
            images = self._colour_layer(images, names, colour, level, negate)
            if _maybe_any(is_geo):
                chain.append(self._affine(names, is_geo, level, negate, images.shape[-2], images.shape[-1]))
                pending = pending | is_geo
        if chain and _maybe_any(pending):
            images = self._warp_where(images, chain, pending)
        return images

    # Colour ops ---------------------------------------------------------------------------------

    def _colour_layer(self, images, names, chosen, level, negate) -> torch.Tensor:
        sign = torch.where(negate, -1.0, 1.0)
        if images.device.type != "cuda":
            return self._colour_layer_subsets(images, names, chosen, level, sign)
        table = _identity_table(images)
        hist = None
        for name in TABLE_OPS:
            if name not in self.ops:
                continue
            mask = chosen & (names == self.ops.index(name))
            if name in ("AutoContrast", "Equalize"):
                hist = _histograms(images) if hist is None else hist
            table = torch.where(mask[:, None, None], _op_table(name, images, level, sign, hist), table)
        out = table.gather(-1, images.flatten(2).long()).view(images.shape).to(torch.uint8)
        for name, degenerate in (("ColorIncreasing", _grey), ("SharpnessIncreasing", _smooth)):
            if name in self.ops:
                mask = chosen & (names == self.ops.index(name))
                if _maybe_any(mask):
                    factor = _enhance_factor(level, sign).float()[:, None, None, None]
                    out = torch.where(mask[:, None, None, None], _blend(degenerate(images), images, factor), out)
        return out

    def _colour_layer_subsets(self, images, names, chosen, level, sign) -> torch.Tensor:
        """:meth:`_colour_layer` off CUDA, in place: each op computed for the samples that chose
        it only (a sample takes one op a layer), the same values with a fraction of the arithmetic."""
        for name in TABLE_OPS + BLEND_OPS:
            if name not in self.ops:
                continue
            index = (chosen & (names == self.ops.index(name))).nonzero()[:, 0]
            if len(index) == 0:
                continue
            sub, lv, sg = images[index], level[index], sign[index]
            if name in BLEND_OPS:
                degenerate = _grey(sub) if name == "ColorIncreasing" else _smooth(sub)
                done = _blend(degenerate, sub, _enhance_factor(lv, sg).float()[:, None, None, None])
            else:
                hist = _channel_histograms(sub) if name in ("AutoContrast", "Equalize") else None
                done = _apply_tables(sub, _op_table(name, sub, lv, sg, hist))
            images[index] = done
        return images

    # Geometric ops ------------------------------------------------------------------------------

    def _affine(self, names, chosen, level, negate, height: int, width: int) -> torch.Tensor:
        """(B, 3, 3) float64 maps from output to input pixel coordinates, identity where unchosen.

        Coordinates are Pillow's: pixel (x, y) covers [x, x + 1) x [y, y + 1).
        """
        sign = torch.where(negate, -1.0, 1.0).to(torch.float64)
        m = _eye_like(level)
        one = torch.ones_like(level)
        zero = torch.zeros_like(level)
        for name in GEOMETRIC:
            if name not in self.ops:
                continue
            if name == "Rotate":
                degrees = (level / LEVELS) * 30.0 * sign
                angle = -torch.deg2rad(degrees)
                a, b = torch.cos(angle), torch.sin(angle)
                cx, cy = width / 2.0, height / 2.0  # Image.rotate's centre
                rows = [a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy]
            elif name in ("ShearX", "ShearY"):
                shear = (level / LEVELS) * 0.3 * sign
                rows = [one, shear, zero, zero, one, zero] if name == "ShearX" else [one, zero, zero, shear, one, zero]
            else:
                pct = (level / LEVELS) * TRANSLATE_PCT * sign
                rows = ([one, zero, pct * width, zero, one, zero] if name == "TranslateXRel"
                        else [one, zero, zero, zero, one, pct * height])
            op_m = torch.stack([torch.stack(rows[:3], -1), torch.stack(rows[3:], -1),
                                torch.stack([zero, zero, one], -1)], -2)
            mask = chosen & (names == self.ops.index(name))
            m = torch.where(mask[:, None, None], op_m, m)
        return m

    def _warp_where(self, images: torch.Tensor, chain: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``images`` with the samples in ``mask`` warped through their chain (last op first).

        On CUDA the whole batch is warped at once (no wait for the mask). On a CPU only the
        chosen samples, in place, one at a time, which keeps the temporaries in cache (about twice as fast
        as a batch at 224 px), and a sample whose maps all keep rows (ShearX, TranslateX) or
        columns is interpolated along that axis alone: the other axis's weight is exactly 0
        there, so the bytes are those of the two-dimensional sampling.
        """
        if images.device.type == "cuda":
            return torch.where(mask[:, None, None, None], affine_sample(images, chain, fill=self.fill, interpolation=self.interpolation), images)
        for i in mask.nonzero()[:, 0].tolist():
            maps = [m[i:i + 1] for m in chain]
            images[i:i + 1] = affine_sample(images[i:i + 1], maps, fill=self.fill, interpolation=self.interpolation,
                                             along=kept_axis(maps))
        return images

class BatchRandomErasing:
    """torchvision's ``v2.RandomErasing(p, scale, ratio, value="random")`` per sample, batched.

    A sample is erased with probability ``p``; its box is the first of 10 drawn (area fraction
    uniform in ``scale``, aspect log-uniform in ``ratio``) that fits, else it is left as is; the
    box is filled with standard normal noise per pixel and channel.
    """

    ATTEMPTS = 10

    def __init__(self, *, p: float = 0.25, scale: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> None:
        if not 0 <= p <= 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"random erasing needs p in [0, 1], scale in (0, 1] and ratio > 0, "
                             f"got {p}, {scale}, {ratio}")
        self.p, self.scale, self.ratio = p, scale, ratio

    def draw(self, batch: int, height: int, width: int, *, generator: torch.Generator) -> torch.Tensor:
        """(B, 4) int64 boxes ``(top, left, height, width)``; height 0 for a sample left as is."""
        dev, shape = generator.device, (batch, self.ATTEMPTS)
        erase = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64) < self.p
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) *
                                 torch.rand(shape, generator=generator, device=dev, dtype=torch.float64))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * torch.rand(shape, generator=generator, device=dev, dtype=torch.float64))
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)
        first = fits.long().argmax(1, keepdim=True)  # the first attempt that fits
        h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
        erase &= fits.any(1)
        u = torch.rand(batch, 2, generator=generator, device=dev, dtype=torch.float64)
        top = (u[:, 0] * (height - h + 1)).floor().long().clamp(max=height - 1)
        left = (u[:, 1] * (width - w + 1)).floor().long().clamp(max=width - 1)
        zero = torch.zeros_like(h)
        return torch.stack([top, left, torch.where(erase, h, zero), torch.where(erase, w, zero)], 1)

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float -> the same with the drawn boxes filled with noise."""
        boxes = self.draw(images.shape[0], images.shape[-2], images.shape[-1], generator=generator)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return self.apply(images, boxes, noise)

    @staticmethod
    def apply(images: torch.Tensor, boxes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Fill each sample's box ``(top, left, height, width)`` with ``noise``'s pixels there."""
        dev = images.device
        rows = torch.arange(images.shape[-2], device=dev)[None, :]
        cols = torch.arange(images.shape[-1], device=dev)[None, :]
        in_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, :1] + boxes[:, 2:3])  # (B, H)
        in_cols = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 1:2] + boxes[:, 3:4])  # (B, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        return torch.where(mask, noise, images)


class BatchAugment:
    """``student.data.Augment``'s recipe on a batch: RandAugment, ToDtype + Normalize, erasing.

    Args:
        rand_augment: level 0..10, or None for off.
        rand_augment_std: the level's noise per op.
        random_erasing: probability, 0 for off.
        mean, std: normalisation (and RandAugment's fill colour).
    """

    def __init__(self, *, rand_augment: float | None = 9, rand_augment_std: float = 0.5,
                 random_erasing: float = 0.25, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.rand_augment = (None if rand_augment is None else
                             BatchRandAugment(magnitude=rand_augment, magnitude_std=rand_augment_std, mean=mean))
        self.erasing = BatchRandomErasing(p=random_erasing) if random_erasing > 0 else None
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_config(cls, augment) -> BatchAugment:
        """From a ``student.data.Augment`` (its ``img_size`` is the images' own size here)."""
        return cls(rand_augment=augment.rand_augment, rand_augment_std=augment.rand_augment_std,
                   random_erasing=augment.random_erasing, mean=augment.mean, std=augment.std)

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the generator's device -> (B, 3, H, W) float32, normalised."""
        if self.rand_augment is not None:
            images = self.rand_augment(images, generator=generator)
        mean = torch.tensor(self.mean, device=images.device)[None, :, None, None]
        std = torch.tensor(self.std, device=images.device)[None, :, None, None]
        out = (images.float() / 255.0 - mean) / std
        if self.erasing is not None:
            out = self.erasing(out, generator=generator)
        return out


# Helpers: tables ---------------------------------------------------------------------------------


def _maybe_any(mask: torch.Tensor) -> bool:
    """Whether work for ``mask`` may be needed: always on CUDA (reading a mask would wait for the
    device), exactly elsewhere, where skipping saves the CPU the arithmetic."""
    return mask.device.type == "cuda" or bool(mask.any())


def _member(names: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return torch.isin(names, torch.tensor(indices, dtype=names.dtype, device=names.device))


def _eye(images: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=torch.float64, device=images.device)


def _eye_like(level: torch.Tensor) -> torch.Tensor:
    return torch.eye(3, dtype=torch.float64, device=level.device).expand(level.shape[0], 3, 3)


def _identity_table(images: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=images.device).expand(images.shape[0], 3, 256)


def _lut_table(name: str, level: torch.Tensor) -> torch.Tensor:
    """(B, 1, 256) tables of the level-only ops, as Pillow builds them in ImageOps."""
    i = torch.arange(256, device=level.device)[None, None, :]
    level = level[:, None, None]
    if name == "Invert":
        return (255 - i).expand(level.shape[0], 1, 256)
    if name == "PosterizeIncreasing":  # keep 4 - int(0.4 level) high bits
        shift = 8 - (4 - torch.floor(level / LEVELS * 4).long())
        return (i >> shift) << shift
    if name == "SolarizeIncreasing":  # invert from 256 - int(25.6 level) up
        thresh = 256 - torch.clamp(torch.floor(level / LEVELS * 256), max=256).long()
        return torch.where(i < thresh, i, 255 - i)
    if name == "SolarizeAdd":  # add int(11 level) below 128
        add = torch.clamp(torch.floor(level / LEVELS * 110), max=128).long()
        return torch.where(i < 128, torch.clamp(i + add, max=255), i)
    raise ValueError(f"no table for {name}")


def _histograms(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 256) int64 counts per sample and channel, in one bincount over offset values."""
    b, c = images.shape[:2]
    offsets = torch.arange(b * c, device=images.device).view(b, c, 1) * 256
    flat = (images.flatten(2).long() + offsets).flatten()
    return torch.bincount(flat, minlength=b * c * 256).view(b, c, 256)


def _channel_histograms(images: torch.Tensor) -> torch.Tensor:
    """:func:`_histograms` a channel at a time: on a CPU a bincount of the bytes themselves is
    ten times faster than one of offset int64 values."""
    b, c = images.shape[:2]
    return torch.stack([torch.bincount(channel.flatten(), minlength=256) for channel in images.flatten(0, 1)]).view(b, c, 256)


def _apply_tables(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 through (B, 1 or 3, 256) tables of values in 0..255, on a CPU: a byte
    lookup per channel (numpy's ``take``, five times faster than a gather by int64 indices)."""
    table = table.expand(images.shape[0], images.shape[1], 256).to(torch.uint8).numpy()
    pixels = images.numpy()
    out = np.empty_like(pixels)
    for i in range(pixels.shape[0]):
        for channel in range(pixels.shape[1]):
            np.take(table[i, channel], pixels[i, channel], out=out[i, channel])
    return torch.from_numpy(out)


def _autocontrast_table(hist: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(cutoff=0): stretch [lowest, highest] present value to [0, 255]."""
    present = hist > 0
    lo = present.long().argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).long().argmax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1).double()
    i = torch.arange(256, device=hist.device, dtype=torch.float64)
    table = torch.trunc(i * scale + (-lo.double() * scale)).clamp(0, 255).long()
    return torch.where(hi > lo, table, i.long())


def _equalize_table(hist: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: Pillow's cumulative-histogram table, identity for near-flat channels."""
    present = hist > 0
    hi = 255 - present.flip(-1).long().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, hi)) // 255
    before = hist.cumsum(-1) - hist
    table = ((step // 2 + before) // step.clamp(min=1)).clamp(0, 255)
    keep = (present.sum(-1, keepdim=True) > 1) & (step > 0)
    return torch.where(keep, table, torch.arange(256, device=hist.device))


def _enhance_factor(level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """timm's _enhance_increasing_level_to_arg: 1 +- 0.09 level, at least 0.1."""
    return torch.clamp(1.0 + sign.double() * ((level / LEVELS) * 0.9), min=0.1)


def _op_table(name: str, images: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
              hist: torch.Tensor | None) -> torch.Tensor:
    """The value table of a table op for each of ``images``: (B, 1 or 3, 256) int64 (``hist``:
    the images' histograms, for AutoContrast and Equalize)."""
    if name == "AutoContrast":
        return _autocontrast_table(hist)
    if name == "Equalize":
        return _equalize_table(hist)
    if name == "ContrastIncreasing":
        return _blend_table(_grey_mean(images)[:, None, None], _enhance_factor(level, sign))
    if name == "BrightnessIncreasing":
        return _blend_table(torch.zeros_like(level)[:, None, None], _enhance_factor(level, sign))
    return _lut_table(name, level)


def _blend_table(degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(constant, image, factor) as a table: (B, 1, 256) int64."""
    i = torch.arange(256, device=factor.device, dtype=torch.float32)
    return _blend(degenerate.float(), i, factor.float()[:, None, None]).long()


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ImagingBlend in float32: truncate ``d + f * (x - d)`` into 0..255."""
    out = degenerate.float() + factor * (image.float() - degenerate.float())
    return torch.trunc(out).clamp(0, 255).to(torch.uint8 if image.dtype == torch.uint8 else torch.float32)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (B, H, W) int32 with its fixed-point weights."""
    rgb = images.int()
    return (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16


def _grey(images: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color's degenerate image: L converted back to RGB."""
    return _luma(images)[:, None].expand_as(images)


def _grey_mean(images: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast's grey level: the L image's mean, rounded half up. (B,) int64."""
    total = _luma(images).flatten(1).long().sum(1)
    return torch.floor(total.double() / (images.shape[-2] * images.shape[-1]) + 0.5).long()


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH (3x3, centre 5, divisor 13, rounded); border pixels kept, as Pillow.

    In integers: a 3x3 sum s of bytes plus 4 x the centre is at most 3,315 (int16), and s / 13
    is never within 1/26 of a half, so rounding it exactly, (2 s + 13) // 26, gives Pillow's
    float32 result without its arithmetic.
    """
    x = images.to(torch.int16)
    rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]  # (B, C, H, W - 2) sums along x
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    total = box.add_(x[..., 1:-1, 1:-1] * 4)
    out = images.clone()
    out[:, :, 1:-1, 1:-1] = total.mul_(2).add_(13).div_(26, rounding_mode="floor").to(torch.uint8)
    return out


__all__ = ["BatchAugment", "BatchRandAugment", "BatchRandomErasing", "RandAugmentParams", "augment_generator"]

"""A view's whole augmentation as a stored record, and the one function that applies it.

DeiT trains on a crop, then RandAugment, random erasing and mixup or CutMix. A label computed on
the crop alone is no longer the teacher's answer on what the student sees. Here every random view
(rows 1..V of ``views.npy``) also carries the parameters of the rest of the recipe:

- RandAugment: ``NUM_OPS`` op indices (``RA_NONE``: not applied), their levels in 1/25 steps and
  a sign bit each, applied by ``shards.format.randaugment.BatchRandAugment``;
- random erasing: a box in view pixels (height 0: none) and the seed of its noise fill;
- mixing: the partner (a sample of the same shard, by key number, and its view), the weight
  ``lam`` of the view's own pixels, and a CutMix box (height 0: a mixup blend).

:func:`draw_records` draws them as a pure function of ``(seed, key, view)``; :func:`pair_group`
picks partners inside a group of ``AugmentSpec.mix_group`` consecutive inputs of a shard, the
same view index on both sides, so that a loader which replays one view index per shard has every
partner's pixels at hand. :class:`ViewRenderer` turns cut views and their records into the
normalised pixels: label-teacher calls it before the teacher, and both student loaders call it to
replay, so replay equals labelling by construction (the stored level, box and lambda are the
applied ones, not a later redraw).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from deitpipe.shards.format.conventions import IMAGENET_MEAN, IMAGENET_STD
from deitpipe.shards.format.schema import AUG_FIELD_NAMES, AUG_FIELDS
from deitpipe.shards.format.views import key_hash

NUM_OPS = 2  # RandAugment ops per view (timm's rand-m9's n)
RA_P = 0.5  # probability that a drawn op is applied (timm's default)
RA_NONE = 255  # ra_op of an op not applied
LEVEL_STEPS = 25  # stored level = round(level * 25): 0..250 in one byte
MIX_NONE = 0xFFFFFFFF  # mix_key of a view that is not mixed
MIX_GROUP = 16  # partners are drawn among this many consecutive inputs of a shard
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing's defaults, as DeiT
ERASE_RATIO = (0.3, 3.3)
_AUG_TAG = 0xA06  # separates these draws from the box draws of the same (seed, key, view)
_PAIR_TAG = 0xFA12



def aug_dtype() -> np.dtype:
    """The packed dtype of one record (33 bytes)."""
    return np.dtype([(name, np.dtype(kind), shape) for name, kind, shape in AUG_FIELDS])


@dataclass(frozen=True)
class AugmentSpec:
    """What label-teacher draws for each random view; stored in the manifest as "augment".

    Args:
        size: the view's side in pixels, the student's input (boxes are in these pixels).
        rand_augment: RandAugment level 0..10 (DeiT's 9), None for off.
        rand_augment_std: the level's noise per op (DeiT's 0.5).
        random_erasing: probability of erasing a box (DeiT's 0.25).
        mixup: mixup's Beta alpha (DeiT's 0.8), 0 for off.
        cutmix: CutMix's Beta alpha (DeiT's 1.0), 0 for off.
        mixup_switch: probability of CutMix when both are on.
        mean, std: the normalisation the records' pixels are in (erasing's noise is N(0, 1) there).
        interpolation: of RandAugment's geometric ops.
        mix_group: inputs of a shard among which partners are drawn.
        cut_interpolation: of the crop's resize (the teacher's), which a replay cuts with too.
    """

    size: int
    rand_augment: float | None = None
    rand_augment_std: float = 0.5
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    mix_group: int = MIX_GROUP
    cut_interpolation: str = "bilinear"
    ops: tuple[str, ...] = field(default=(), compare=False)  # filled from timm in __post_init__

    def __post_init__(self) -> None:
        if self.size < 1 or self.size > 65535:
            raise ValueError(f"the view size must be in [1, 65535], got {self.size}")
        if self.rand_augment is not None and not 0 <= self.rand_augment <= 10:
            raise ValueError(f"--rand-augment must be a level in [0, 10], got {self.rand_augment}")
        if self.rand_augment_std < 0 or not 0 <= self.random_erasing <= 1 or not 0 <= self.mixup_switch <= 1:
            raise ValueError("--rand-augment-std must be >= 0, --random-erasing and --mixup-switch in [0, 1]")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"--mixup and --cutmix must be >= 0, got {self.mixup}, {self.cutmix}")
        if self.mix_group < 2:
            raise ValueError(f"mix_group must be at least 2, got {self.mix_group}")
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not self.ops:
            from timm.data.auto_augment import rand_augment_choices

            object.__setattr__(self, "ops", tuple(rand_augment_choices("", increasing=True)))
        if len(self.ops) >= RA_NONE:
            raise ValueError(f"at most {RA_NONE - 1} RandAugment ops fit a record, got {len(self.ops)}")

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def active(self) -> bool:
        """Whether anything beyond crop and flip is drawn."""
        return self.rand_augment is not None or self.random_erasing > 0 or self.mixes

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentSpec:
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def no_records(n: int) -> np.ndarray:
    """``n`` records that change nothing (the global view's, or a view before its draw)."""
    rec = np.zeros(n, dtype=aug_dtype())
    rec["ra_op"] = RA_NONE
    rec["mix_key"] = MIX_NONE
    rec["lam"] = 1.0
    return rec


def key_number(key: str) -> int:
    """The input index in a sample key (``s000000042`` -> 42), what ``mix_key`` stores."""
    return int(key[1:])


def draw_records(spec: AugmentSpec, *, seed: int, key: str, num_views: int) -> np.ndarray:
    """Draw the records of one sample's views: row 0 (the global view) changes nothing, row v in
    1..V is a pure function of ``(seed, key, v)``. Partners are left unset (:func:`pair_group`).

    Returns:
        (V + 1,) records of :func:`aug_dtype`.
    """
    rec = no_records(num_views + 1)
    khash = key_hash(key)
    for v in range(1, num_views + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, khash, v, _AUG_TAG]))
        row = rec[v]
        if spec.rand_augment is not None:
            _draw_rand_augment(spec, rng, row)
        if spec.random_erasing > 0:
            _draw_erasing(spec, rng, row)
        if spec.mixes:
            _draw_mix(spec, rng, row)
    return rec


def _draw_rand_augment(spec: AugmentSpec, rng: np.random.Generator, row: np.void) -> None:
    """timm's RandAugment draws: op with replacement, applied with p, level ~ N(m, std) in [0, 10]."""
    sign = 0
    for k in range(NUM_OPS):
        op = int(rng.integers(len(spec.ops)))
        applied = rng.random() <= RA_P
        if math.isinf(spec.rand_augment_std):
            level = rng.random() * spec.rand_augment
        else:
            level = spec.rand_augment + spec.rand_augment_std * rng.standard_normal()
        negate = rng.random() > 0.5
        row["ra_op"][k] = op if applied else RA_NONE
        row["ra_level"][k] = int(round(min(max(level, 0.0), 10.0) * LEVEL_STEPS))
        sign |= int(negate) << k
    row["ra_sign"] = sign


def _draw_erasing(spec: AugmentSpec, rng: np.random.Generator, row: np.void) -> None:
    """torchvision's ``RandomErasing.get_params``: the first of 10 boxes that fits, else none."""
    erase = rng.random() < spec.random_erasing
    size = spec.size
    area = size * size
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*ERASE_SCALE)
        aspect = math.exp(rng.uniform(lo, hi))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if h < size and w < size:
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if erase:
                row["erase"] = (top, left, h, w)
            break
    row["noise"] = int(rng.integers(0, 2**32, dtype=np.uint64))


def _draw_mix(spec: AugmentSpec, rng: np.random.Generator, row: np.void) -> None:
    """timm's Mixup draws (elementwise): CutMix with ``mixup_switch`` when both are on, lambda
    from Beta(alpha, alpha), CutMix's box by ``rand_bbox`` and lambda corrected to its area."""
    cut = spec.cutmix > 0 and (spec.mixup <= 0 or rng.random() < spec.mixup_switch)
    alpha = spec.cutmix if cut else spec.mixup
    lam = float(rng.beta(alpha, alpha))
    if cut:
        size = spec.size
        ratio = math.sqrt(1.0 - lam)
        cut_len = int(size * ratio)
        cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
        yl, yh = np.clip([cy - cut_len // 2, cy + (cut_len + 1) // 2], 0, size)
        xl, xh = np.clip([cx - cut_len // 2, cx + (cut_len + 1) // 2], 0, size)
        row["cut"] = (yl, xl, yh - yl, xh - xl)
        lam = 1.0 - float((yh - yl) * (xh - xl)) / (size * size)
        if yh == yl or xh == xl:
            row["cut"] = (0, 0, 0, 0)  # nothing pasted: the view is its own
    row["lam"] = lam  # stored as float16; the stored value is the one applied


def pair_group(keys: Sequence[str], records: Sequence[np.ndarray], *, seed: int) -> None:
    """Pick each view's partner among one mix group's samples, in place.

    For every view v, the group's samples are shuffled (a pure function of the seed, the group's
    first key and v) and taken two by two; each pair mixes with the other's view v. A sample left
    over (an odd group) is not mixed in that view: its ``lam`` becomes 1 and its box empty.

    Args:
        keys: the group's sample keys, in shard order (the inputs that decoded).
        records: each sample's (V + 1,) records from :func:`draw_records`, all with the same V.
        seed: the run seed.
    """
    if not keys:
        return
    views = len(records[0]) - 1
    first = key_hash(keys[0])
    for v in range(1, views + 1):
        order = np.random.default_rng(np.random.SeedSequence([seed, first, v, _PAIR_TAG])).permutation(len(keys))
        for a, b in zip(order[0::2], order[1::2]):
            for own, other in ((a, b), (b, a)):
                records[own][v]["mix_key"] = key_number(keys[other])
                records[own][v]["mix_view"] = v
        if len(keys) % 2:
            single = records[order[-1]][v]
            single["mix_key"], single["lam"], single["cut"] = MIX_NONE, 1.0, (0, 0, 0, 0)



class ViewRenderer:
    """Applies records to cut views: RandAugment, normalisation, erasing, then mixing.

    Args:
        spec: the label set's :class:`AugmentSpec`.
    """

    def __init__(self, spec: AugmentSpec) -> None:
        from deitpipe.shards.format.randaugment import BatchRandAugment

        self.spec = spec
        self.ra = (None if spec.rand_augment is None else
                   BatchRandAugment(num_ops=NUM_OPS, magnitude=spec.rand_augment, p=RA_P, mean=spec.mean,
                                    interpolation=spec.interpolation, ops=spec.ops))

    def __call__(self, views: torch.Tensor, records: np.ndarray, partner: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Render ``views`` under their records.

        Args:
            views: (N, 3, S, S) uint8 cut views (crop and flip), on any device.
            records: (N,) records, one per view.
            partner: (N,) the row of each view's partner in ``views`` (its own record unmixed is
                applied to it first), -1 where the view is not mixed.
        Returns:
            (N, 3, S, S) float32, normalised with the spec's mean and std, on the views' device.
        """
        dev = views.device
        images = self.apply_rand_augment(views, records)
        mean = torch.tensor(self.spec.mean, device=dev)[None, :, None, None]
        std = torch.tensor(self.spec.std, device=dev)[None, :, None, None]
        out = images.float().div_(255.0).sub_(mean).div_(std)  # (x / 255 - mean) / std, in place
        self.erase(out, records)
        return self.mix(out, records, np.asarray(partner, dtype=np.int64))

    def apply_rand_augment(self, views: torch.Tensor, records: np.ndarray) -> torch.Tensor:
        if self.ra is None:
            return views
        ops = records["ra_op"].astype(np.int64)
        applied = ops != RA_NONE
        if not applied.any():
            return views
        from deitpipe.shards.format.randaugment import RandAugmentParams

        dev = views.device
        bits = records["ra_sign"].astype(np.int64)[:, None] >> np.arange(NUM_OPS)[None, :]
        params = RandAugmentParams(
            op=torch.from_numpy(np.where(applied, ops, 0)).to(dev),
            applied=torch.from_numpy(applied).to(dev),
            level=torch.from_numpy(records["ra_level"].astype(np.float64) / LEVEL_STEPS).to(dev),
            negate=torch.from_numpy((bits & 1).astype(bool)).to(dev))
        return self.ra.apply(views, params)

    @staticmethod
    def erase(images: torch.Tensor, records: np.ndarray) -> None:
        """Fill each erased box with N(0, 1) noise from the record's seed (torchvision's
        ``value="random"``), generated on the CPU so every device gets the same values."""
        for i in np.flatnonzero(records["erase"][:, 2]):
            top, left, h, w = (int(x) for x in records["erase"][i])
            noise = torch.randn((images.shape[1], h, w), generator=torch.Generator().manual_seed(int(records["noise"][i])))
            images[i, :, top:top + h, left:left + w] = noise.to(images.device)

    @staticmethod
    def mix(images: torch.Tensor, records: np.ndarray, partner: np.ndarray) -> torch.Tensor:
        """Each mixed row blended with (mixup) or pasted from (CutMix) its partner's row, as they
        were before mixing: on CUDA in one batched pass, elsewhere a row at a time (the same
        float32 arithmetic, without full-batch temporaries)."""
        mixed = np.flatnonzero(partner >= 0)
        if len(mixed) == 0:
            return images
        return (_mix_batched if images.device.type == "cuda" else _mix_rows)(images, records, partner, mixed)


def _mix_rows(images: torch.Tensor, records: np.ndarray, partner: np.ndarray, mixed: np.ndarray) -> torch.Tensor:
    out = images.clone()
    for i in mixed:
        own, other = images[i], images[int(partner[i])]
        top, left, h, w = (int(v) for v in records["cut"][i])
        if h > 0:
            out[i, :, top:top + h, left:left + w] = other[:, top:top + h, left:left + w]
        else:
            lam = float(records["lam"][i])  # a float16 value: exact in float32, as is 1 - lam
            torch.mul(own, lam, out=out[i]).add_(other * (1.0 - lam))  # lam own + (1 - lam) other
    return out


def _mix_batched(images: torch.Tensor, records: np.ndarray, partner: np.ndarray, mixed: np.ndarray) -> torch.Tensor:
    dev = images.device
    out = images.clone()
    rows = torch.from_numpy(mixed).to(dev)
    own, other = images[rows], images[torch.from_numpy(partner[mixed]).to(dev)]
    lam = torch.from_numpy(records["lam"][mixed].astype(np.float32)).to(dev)[:, None, None, None]
    cut = torch.from_numpy(records["cut"][mixed].astype(np.int64)).to(dev)
    ys = torch.arange(images.shape[-2], device=dev)[None, :]
    xs = torch.arange(images.shape[-1], device=dev)[None, :]
    in_y = (ys >= cut[:, :1]) & (ys < cut[:, :1] + cut[:, 2:3])
    in_x = (xs >= cut[:, 1:2]) & (xs < cut[:, 1:2] + cut[:, 3:4])
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    is_cut = (cut[:, 2] > 0)[:, None, None, None]
    blended = lam * own + (1.0 - lam) * other
    out[rows] = torch.where(is_cut, torch.where(box, other, own), blended)
    return out


def mixed_label(own: np.ndarray, other: np.ndarray | None, lam: float) -> np.ndarray:
    """The class head's target of a mixed view: ``lam * own + (1 - lam) * other`` ((C,) rows)."""
    if other is None:
        return own
    return (lam * own + (1.0 - lam) * other).astype(np.float32)


def stack_records(columns: Mapping[str, Any], *, prefix: str = "") -> np.ndarray:
    """Records of :func:`aug_dtype` from one column per field (``prefix + name``), any leading
    shape: a sample's (V + 1,), a chunk's (n, V + 1), a batch's (B,)."""
    shape = np.shape(columns[prefix + "ra_sign"])  # a scalar field: its shape is the records'
    rec = np.zeros(shape, dtype=aug_dtype())
    for name in AUG_FIELD_NAMES:
        rec[name] = np.asarray(columns[prefix + name])
    return rec


def records_of(sample: dict[str, Any]) -> np.ndarray | None:
    """A decoded sample's (V + 1,) records (``reader.decode_sample``), None before version 3."""
    return stack_records(sample) if "ra_op" in sample else None


__all__ = ["AUG_FIELDS", "AUG_FIELD_NAMES", "AugmentSpec", "MIX_GROUP", "MIX_NONE", "RA_NONE", "ViewRenderer",
           "aug_dtype", "draw_records", "key_number", "mixed_label", "no_records", "pair_group", "records_of",
           "stack_records"]


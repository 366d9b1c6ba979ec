"""Stage two's input: replay the teacher's stored views from the shards, then the DeiT recipe.

Each epoch a rank reads its shards (``shards.format.plan.epoch_shard_order``, a pure function of
seed, epoch, rank and world size), shuffles each shard's samples (``epoch_sample_order``), and for
every sample cuts one stored view (``epoch_view_index``) with the same function the teacher's
views were cut with (``shards.format.image.cut_view``). The distillation target is that view's
stored distribution, so the label matches the pixels. Every rank yields exactly
``steps_per_epoch`` full batches, so DDP ranks stay in step.

Teacher-label modes:
    views:  replay a stored view and its label (default when the shards have views).
    global: a fresh random crop each step with the image's global label (the "fixed teacher").
    none:   a fresh random crop, no teacher target.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import RandAugment as TimmRandAugment
from timm.data import rand_augment_ops
from timm.data.auto_augment import posterize, rand_augment_choices
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deitpipe.shards.format.augment import (MIX_NONE, AugmentSpec, ViewRenderer, key_number, mixed_label,
                                            records_of)
from deitpipe.shards.format.image import IMAGENET_MEAN, IMAGENET_STD, cut_view, decode_image
from deitpipe.shards.format.plan import epoch_sample_order, epoch_shard_order
from deitpipe.shards.format.reader import decode_sample, read_shard, shard_name, teacher_distribution
from deitpipe.shards.format.schema import UNLABELED
from deitpipe.shards.format.views import epoch_view_index, key_hash, random_view_boxes

TEACHER_LABELS = ("views", "global", "none")
_FRESH_CROP_TAG = 0x5EED  # separates fresh-crop draws from the stored views' seeds


class RandAugment:
    """timm's RandAugment as DeiT configures it (``rand-m9-mstd0.5-inc1``), on uint8 tensors.

    timm measures the level in 0..10 of each op's range, draws it per op from
    N(magnitude, magnitude_std) clipped to [0, 10], and applies each of ``num_ops`` chosen ops
    with probability ``p``. The op set is timm's "increasing" one, with Invert and SolarizeAdd,
    as DeiT trained with. timm's ops work on PIL images and draw from Python's ``random`` and
    numpy's global generators, which ``ShardReplay`` seeds per (seed, epoch, rank, worker).

    Args:
        num_ops: ops drawn per image (2 in DeiT).
        magnitude: level 0..10 (9 in DeiT).
        magnitude_std: standard deviation of the level per op (0.5 in DeiT; 0 for a fixed level).
        p: probability that a drawn op is applied (0.5 in timm).
        img_size: the image size, which sets the translation range (0.45 of it, as timm).
        mean: fill colour of the geometric ops, as fractions (timm fills with the mean).
        interpolation: of the geometric ops ("bicubic" in DeiT).
    """

    LEVELS = 10

    def __init__(self, *, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 p: float = 0.5, img_size: int = 224, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 interpolation: str = "bicubic") -> None:
        if not 0 <= magnitude <= self.LEVELS:
            raise ValueError(f"--rand-augment must be a level in [0, {self.LEVELS}], got {magnitude}")
        if magnitude_std < 0 or not 0 <= p <= 1 or num_ops < 1:
            raise ValueError(f"RandAugment needs num_ops >= 1, magnitude_std >= 0 and p in [0, 1], "
                             f"got {num_ops}, {magnitude_std}, {p}")
        hparams = {"translate_const": int(img_size * 0.45), "magnitude_std": float(magnitude_std),
                   "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": str_to_pil_interp(interpolation)}
        ops = rand_augment_ops(magnitude=float(magnitude), prob=float(p), hparams=hparams,
                               transforms=rand_augment_choices("", increasing=True))
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
        self.timm = TimmRandAugment(ops, num_layers=num_ops)
        self.level, self.level_std, self.ops, self.p = float(magnitude), float(magnitude_std), num_ops, float(p)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, H, W) uint8."""
        return F.pil_to_tensor(self.timm(F.to_pil_image(image)))


def _posterize(img: Image.Image, bits: int, **kwargs) -> Image.Image:
    """timm's posterize, defined at 0 bits: timm asks for 0 at level 10, which Pillow 13 refuses
    and older Pillow (like TensorFlow's op) answered with a black image."""
    return Image.new(img.mode, img.size) if bits < 1 else posterize(img, bits, **kwargs)


def seed_host_generators(*, seed: int, epoch: int, rank: int, worker: int) -> None:
    """Seed Python's and numpy's global generators (timm's RandAugment draws from them) from
    (seed, epoch, rank, worker), so an epoch replays exactly after a resume."""
    state = np.random.SeedSequence([seed, epoch, rank, worker, _FRESH_CROP_TAG]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))


@dataclass(frozen=True)
class Augment:
    """The DeiT recipe's per-image augmentations after the view is cut.

    Args:
        rand_augment: RandAugment level 0..10 on timm's scale (9 in DeiT's rand-m9-mstd0.5), or
            None for off.
        rand_augment_std: the level's noise per op (0.5 in DeiT).
        random_erasing: probability of random erasing (0.25 in DeiT), 0 for off.
        mean, std: normalisation.
        img_size: the image size (RandAugment's translation range).
    """

    rand_augment: float | None = 9
    rand_augment_std: float = 0.5
    random_erasing: float = 0.25
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    img_size: int = 224

    def build(self) -> v2.Compose:
        ops: list = []
        if self.rand_augment is not None:
            ops.append(RandAugment(magnitude=self.rand_augment, magnitude_std=self.rand_augment_std,
                                   img_size=self.img_size, mean=self.mean))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if self.random_erasing > 0:
            ops.append(v2.RandomErasing(p=self.random_erasing, value="random"))
        return v2.Compose(ops)


_PASS_STRIDE = 1_000_003  # draw_epoch of a further pass within an epoch: never another epoch's
_SHARD_VIEW_TAG = 0x5A1E  # the view a shard with stored mixing replays in an epoch
_RENDER_GROUP = 32  # stored views rendered per call of the batched ops


def steps_per_epoch(num_samples: int, *, batch_size: int, world_size: int, repeats: float = 1.0) -> int:
    """Optimizer steps per epoch so that an epoch covers the data set about ``repeats`` times."""
    return max(1, int(num_samples * repeats) // (batch_size * world_size))


class ShardReplay(IterableDataset):
    """Training samples from label-teacher shards, as dicts of image, label and teacher target.

    Args:
        urls: shard paths/URLs in manifest order.
        num_classes: C of the teacher distribution.
        num_views: V random views stored per sample.
        teacher_labels: "views", "global" or "none".
        img_size: the student's input size.
        batch_size: per-rank batch (the rank yields ``steps * batch_size`` samples per epoch).
        steps: optimizer steps per epoch.
        seed: run seed.
        rank, world_size: this rank and the number of ranks.
        augment: what follows the crop.
        interpolation: resize interpolation of the crop.
        min_scale: smallest crop area of the fresh crops in "global" and "none" modes.
        checksums: shard URL -> the manifest's sha256; each shard is checked as it is read, and a
            changed one stops the run (``shards.format.reader.ShardChangedError``).
        stored_augment: the label set's ``augment`` (an ``AugmentSpec`` or its dict; None: its
            views store crop and flip only). Each stored view is then replayed whole: its
            RandAugment, erasing and mixing partner, by the renderer label-teacher labelled it
            with; ``augment`` adds its RandAugment before and its erasing after, which the
            teacher did not see. With mixing, a shard replays one view index per epoch and
            yields each pair of partners together.
    """

    def __init__(self, *, urls: list[str], num_classes: int, num_views: int, teacher_labels: str,
                 img_size: int, batch_size: int, steps: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: Augment = Augment(), interpolation: str = "bilinear",
                 min_scale: float = 0.08, checksums: dict[str, str] | None = None, class_targets: str = "hard",
                 stored_augment: AugmentSpec | dict | None = None):
        if teacher_labels not in TEACHER_LABELS:
            raise ValueError(f"--teacher-labels must be one of {', '.join(TEACHER_LABELS)}, got {teacher_labels!r}")
        if teacher_labels == "views" and num_views < 1:
            raise ValueError("--teacher-labels views needs shards with views (label-teacher --views N, N >= 1)")
        if not urls:
            raise ValueError("no shards to read")
        self.urls, self.num_classes, self.num_views = list(urls), num_classes, num_views
        self.teacher_labels, self.img_size, self.interpolation = teacher_labels, img_size, interpolation
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.rank, self.world_size = rank, world_size
        self.scale = (min_scale, 1.0)
        self.checksums = dict(checksums or {})
        if class_targets not in ("hard", "soft"):
            raise ValueError(f"class_targets must be hard or soft, got {class_targets!r}")
        self.class_targets = class_targets
        self.transform = augment.build()
        self.stored = (AugmentSpec.from_dict(stored_augment) if isinstance(stored_augment, dict)
                       else stored_augment)
        if self.stored is not None:
            if teacher_labels != "views":
                raise ValueError("shards that store each view's augmentation replay their stored views; "
                                 "--teacher-labels global does not apply to them")
            if self.stored.size != img_size:
                raise ValueError(f"the shards store augmented views of {self.stored.size} px; train the student at "
                                 f"--img-size {self.stored.size}, or relabel with --view-size {img_size}")
            self.renderer = ViewRenderer(self.stored)
            self.interpolation = self.stored.cut_interpolation  # the crop label-teacher rendered
            self.extra_ra = (RandAugment(magnitude=augment.rand_augment, magnitude_std=augment.rand_augment_std,
                                         img_size=img_size, mean=augment.mean)
                             if augment.rand_augment is not None else None)
            self.extra_erase = v2.RandomErasing(p=augment.random_erasing, value="random") if augment.random_erasing else None
        self.epoch = self.draw_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.draw_epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def _quota(self, worker: int, workers: int) -> int:
        # Whole batches per DataLoader worker, so the loader never emits a short batch.
        return (self.steps // workers + (worker < self.steps % workers)) * self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = epoch_shard_order(shards=self.urls, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                   world_size=self.world_size)
        mine = shards[worker::workers] or [shards[worker % len(shards)]]
        quota = self._quota(worker, workers)
        if quota == 0:
            return
        seed_host_generators(seed=self.seed, epoch=self.epoch, rank=self.rank, worker=worker)
        produced = 0
        # Cycle this worker's shards until its quota is met (a short rank rereads from its start).
        for n, url in enumerate(itertools.cycle(mine)):
            if n == len(mine) and produced == 0:  # a whole pass yielded nothing: it never will
                raise ValueError(f"shards {', '.join(shard_name(u) for u in mine)} hold no samples")
            raw = read_shard(url, sha256=self.checksums.get(url))
            # A rank that passes over its shards more than once an epoch (a short rank, or
            # --epoch-repeats) draws other orders and views on each further pass.
            self.draw_epoch = self.epoch + (n // len(mine)) * _PASS_STRIDE
            order = epoch_sample_order(num_samples=len(raw), seed=self.seed, epoch=self.draw_epoch,
                                       shard=shard_name(url))
            for example in self._shard_examples(raw, order, url):
                yield example
                produced += 1
                if produced == quota:
                    return

    def _shard_examples(self, raw: list[dict], order: list[int], url: str) -> Iterator[dict]:
        """One shard's examples in ``order``; with stored mixing, each pair of partners together."""
        if self.stored is None:
            for i in order:
                yield self.example(self._decoded(raw[i], url))
            return
        samples = [self._decoded(r, url) for r in raw]
        if not self.stored.mixes:
            for start in range(0, len(order), _RENDER_GROUP):
                group = [samples[i] for i in order[start:start + _RENDER_GROUP]]
                yield from self.replay(group, [self.view_of(s, height=0, width=0)[0] for s in group], len(group))
            return
        position = {key_number(s["key"]): k for k, s in enumerate(samples)}
        done: set[int] = set()
        emitted: list[int] = []
        lenders: list[int] = []  # partners yielded before, rendered again for their pixels only
        view = self.shard_view(samples[0], url) if samples else 0
        for i in order:
            if i in done:
                continue
            key = int(samples[i]["mix_key"][view])
            partner = position.get(key) if key != MIX_NONE else None
            if key != MIX_NONE and (partner is None or int(samples[i]["mix_view"][view]) != view):
                raise ValueError(f"{url}: sample {samples[i]['key']} view {view} mixes with sample {key}, whose view "
                                 "the shard does not hold; relabel the shard")
            unit = [i] if partner is None or partner == i or partner in done else [i, partner]
            if partner is not None and partner in done and partner not in emitted:
                lenders.append(partner)
            done.update(unit)
            emitted += unit
            if len(emitted) >= _RENDER_GROUP:
                yield from self._replay_group(samples, emitted, lenders, view)
                emitted, lenders = [], []
        if emitted:
            yield from self._replay_group(samples, emitted, lenders, view)

    def _replay_group(self, samples: list[dict], emitted: list[int], lenders: list[int],
                      view: int) -> list[dict[str, torch.Tensor]]:
        """Render several units at once (one call amortises the batched ops' overhead)."""
        group = [samples[k] for k in emitted] + [samples[k] for k in dict.fromkeys(lenders) if k not in emitted]
        return self.replay(group, [view] * len(group), len(emitted))

    def shard_view(self, sample: dict, url: str) -> int:
        """The view a shard with stored mixing replays this epoch, the same index for all its
        samples (partners mix the same view index): a pure function of (seed, epoch, shard)."""
        views = len(sample["box"]) - 1
        ss = np.random.SeedSequence([self.seed, self.draw_epoch, key_hash(shard_name(url)), _SHARD_VIEW_TAG])
        return 1 + int(ss.generate_state(1, dtype=np.uint32)[0]) % views if views > 0 else 0

    def replay(self, samples: list[dict], views: list[int], emit: int) -> list[dict[str, torch.Tensor]]:
        """The first ``emit`` of ``samples`` (the rest only lend their pixels as mixing partners),
        each stored view rendered whole, with its targets."""
        records = np.stack([records_of(s)[v] for s, v in zip(samples, views)])
        cuts = []
        for s, v in zip(samples, views):
            pixels = cut_view(decode_image(s["image"]), tuple(int(x) for x in s["box"][v]), bool(s["flip"][v]),
                              self.img_size, interpolation=self.interpolation)
            cuts.append(self.extra_ra(pixels) if self.extra_ra is not None else pixels)
        partner = partner_rows(samples, records)
        images = self.renderer(torch.stack(cuts), records, partner)
        out = []
        for k in range(emit):
            image = self.extra_erase(images[k]) if self.extra_erase is not None else images[k]
            other = samples[partner[k]] if partner[k] >= 0 else None
            out.append({"image": image, **self.targets(samples[k], views[k], partner=other,
                                                       lam=float(records["lam"][k]))})
        return out

    def _decoded(self, raw: dict, url: str) -> dict:
        """A stored sample decoded and checked: its true label one of the set's classes."""
        sample = decode_sample(raw)
        if not (0 <= sample["label"] < self.num_classes or sample["label"] == UNLABELED):
            raise ValueError(f"{url}: sample {sample['key']} has label {sample['label']}, outside the "
                             f"{self.num_classes} classes of its manifest; relabel the shard or fix its .cls")
        return sample

    def view_of(self, sample: dict, *, height: int, width: int) -> tuple[int, tuple[int, ...], bool]:
        """This epoch's view of ``sample``: (row of its teacher label, box, flip).

        ``views``: a stored view and its box. Otherwise a fresh random crop of the
        ``height`` x ``width`` image, labelled with the global view (row 0): the fixed teacher.
        """
        if self.teacher_labels == "views":
            view = epoch_view_index(seed=self.seed, epoch=self.draw_epoch, key=sample["key"],
                                    num_views=len(sample["box"]) - 1)  # sets of other V may be mixed
            return view, tuple(int(v) for v in sample["box"][view]), bool(sample["flip"][view])
        boxes, flips = random_view_boxes(seed=self.seed * 1_000_003 + self.draw_epoch + _FRESH_CROP_TAG,
                                         key=sample["key"], num_views=1, height=height, width=width,
                                         scale=self.scale)
        return 0, tuple(int(v) for v in boxes[0]), bool(flips[0])

    def example(self, sample: dict) -> dict[str, torch.Tensor]:
        """One training example: the cut view, augmented, with its true and teacher labels."""
        img = decode_image(sample["image"])
        view, box, flip = self.view_of(sample, height=img.height, width=img.width)
        pixels = cut_view(img, box, flip, self.img_size, interpolation=self.interpolation)
        return {"image": self.transform(pixels), **self.targets(sample, view)}

    def targets(self, sample: dict, view: int, *, partner: dict | None = None,
                lam: float = 1.0) -> dict[str, torch.Tensor]:
        """The labels of ``sample``'s view: "label" for the class head, and the teacher's
        "teacher" (C,) and "teacher_hard" unless no teacher labels are read.

        A sample without a true label takes the teacher's: its argmax, or with
        ``class_targets="soft"`` its distribution; then every "label" is a (C,) row (one-hot for
        the labelled), so that a batch mixing both stacks. On shards with stored augmentation
        "label" is always a (C,) row: with a mixing ``partner``, ``lam`` times the sample's
        one-hot plus ``1 - lam`` times the partner's (the teacher's target on the mixed view
        where either has no true label).
        """
        if self.stored is not None:
            return self._stored_targets(sample, view, partner, lam)
        out: dict[str, torch.Tensor] = {}
        if self.teacher_labels != "none":
            dist = teacher_distribution(sample, view, self.num_classes)
            out["teacher"] = torch.from_numpy(dist)
            out["teacher_hard"] = torch.tensor(int(sample["hard"][view]), dtype=torch.long)
        label = int(sample["label"])
        if label < 0:
            if self.teacher_labels == "none":
                raise ValueError(f"{sample.get('url')}: sample {sample['key']} has no true label and no teacher label "
                                 "is read; train with --distillation hard or soft")
            out["label"] = out["teacher"].clone() if self.class_targets == "soft" else out["teacher_hard"].clone()
        elif self.class_targets == "soft":
            out["label"] = torch.nn.functional.one_hot(torch.tensor(label), self.num_classes).float()
        else:
            out["label"] = torch.tensor(label, dtype=torch.long)
        return out


    def _one_hot(self, label: int) -> np.ndarray:
        row = np.zeros(self.num_classes, dtype=np.float32)
        row[label] = 1.0
        return row

    def _stored_targets(self, sample: dict, view: int, partner: dict | None, lam: float) -> dict[str, torch.Tensor]:
        dist = teacher_distribution(sample, view, self.num_classes)
        hard = int(sample["hard"][view])
        out = {"teacher": torch.from_numpy(dist), "teacher_hard": torch.tensor(hard, dtype=torch.long)}
        labels = [int(sample["label"])] + ([int(partner["label"])] if partner is not None else [])
        if min(labels) < 0:
            row = dist.copy() if self.class_targets == "soft" else self._one_hot(hard)
        else:
            other = self._one_hot(labels[1]) if partner is not None else None
            row = mixed_label(self._one_hot(labels[0]), other, lam)
        out["label"] = torch.from_numpy(np.asarray(row, dtype=np.float32))
        return out


def partner_rows(samples: list[dict], records: np.ndarray) -> np.ndarray:
    """Each sample's partner's row among ``samples`` (-1: not mixed, or not among them)."""
    where = {key_number(s["key"]): k for k, s in enumerate(samples)}
    return np.asarray([-1 if int(r["mix_key"]) == MIX_NONE else where.get(int(r["mix_key"]), -1) for r in records],
                      dtype=np.int64)


# IMAGENET_MEAN and IMAGENET_STD are re-exported; they are defined in shards.format.conventions.
__all__ = ["Augment", "ShardReplay", "partner_rows", "steps_per_epoch", "TEACHER_LABELS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

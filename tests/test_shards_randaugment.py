"""The batched DeiT augmentation: every op against timm's Pillow op, draws, erasing, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import v2

from deitpipe.student.data import Augment, RandAugment
from deitpipe.student.engine import MixupCutmix
from deitpipe.shards.format.randaugment import (
    GEOMETRIC,
    BatchAugment,
    BatchRandAugment,
    BatchRandomErasing,
    RandAugmentParams,
    augment_generator,
)
from deitpipe.shards.format.warp import affine_sample

CPU_AUGMENT = RandAugment()  # the CPU path's op set and hyper-parameters, to compare with


def photo(height: int, width: int, seed: int = 0, noise: float = 20.0) -> np.ndarray:
    """A photo-like RGB array: smooth colour waves plus noise, so every op has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    img = np.stack([128 + 90 * np.sin(6 * x + 2 * c + 3 * y) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, noise, (height, width, 3)), 0, 255).astype(np.uint8)


def to_batch(*arrays: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).contiguous()


def timm_op(name: str, img: np.ndarray, *, level: float, negate: bool, monkeypatch,
            interpolation: str = "bicubic") -> np.ndarray:
    """timm's Pillow op at a fixed level and sign, with the CPU path's hyper-parameters."""
    hparams = {**CPU_AUGMENT.timm.ops[0].hparams, "magnitude_std": 0.0,
               "interpolation": str_to_pil_interp(interpolation)}
    op = AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
    # timm negates when random.random() > 0.5; the op itself draws nothing else at prob 1, std 0
    monkeypatch.setattr(auto_augment.random, "random", lambda: 0.9 if negate else 0.1)
    out = np.asarray(op(Image.fromarray(img)))
    monkeypatch.undo()
    return out


def test_op_set_and_fill_are_the_cpu_paths():
    aug = BatchRandAugment()
    assert aug.ops == tuple(op.name for op in CPU_AUGMENT.timm.ops)
    assert aug.fill == CPU_AUGMENT.timm.ops[0].kwargs["fillcolor"]
    assert len(aug.ops) == 15


CASES = [(9.3, False), (7.1, True), (10.0, False), (3.3, True), (0.0, False)]


@pytest.mark.parametrize("name", BatchRandAugment().ops)
def test_each_op_matches_timms_pillow_op(name, monkeypatch):
    aug = BatchRandAugment()
    images = [photo(40, 56, seed=1), photo(33, 33, seed=2)]
    for img in images:
        for level, negate in CASES:
            if name == "PosterizeIncreasing" and level == 10.0:
                continue  # Pillow 13 refuses 0 bits; see test_posterize_keeps_no_bits_at_level_10
            want = timm_op(name, img, level=level, negate=negate, monkeypatch=monkeypatch)
            params = RandAugmentParams.forced(aug.ops, [name], level=level, negate=negate)
            got = aug.apply(to_batch(img), params)[0].permute(1, 2, 0).numpy()
            diff = np.abs(got.astype(int) - want.astype(int))
            if name in GEOMETRIC:  # float32 interpolation: a rare truncation lands one level off
                assert diff.max() <= 1 and diff.mean() < 0.01, (name, level, negate, diff.mean())
            else:
                assert diff.max() == 0, (name, level, negate, int(diff.max()), int((diff > 0).sum()))


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_ops_match_pillow_bilinear_too(name, monkeypatch):
    aug = BatchRandAugment(interpolation="bilinear")
    img = photo(40, 56, seed=3)
    for level, negate in CASES:
        want = timm_op(name, img, level=level, negate=negate, monkeypatch=monkeypatch, interpolation="bilinear")
        got = aug.apply(to_batch(img), RandAugmentParams.forced(aug.ops, [name], level=level, negate=negate))
        diff = np.abs(got[0].permute(1, 2, 0).numpy().astype(int) - want.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.06


def test_posterize_keeps_no_bits_at_level_10():
    # timm's level 10 means "keep 0 bits"; Pillow up to 12 gave black, Pillow 13 raises.
    aug = BatchRandAugment()
    out = aug.apply(to_batch(photo(8, 8)), RandAugmentParams.forced(aug.ops, ["PosterizeIncreasing"], level=10.0))
    assert int(out.max()) == 0


def test_a_batch_applies_each_samples_own_op(monkeypatch):
    aug = BatchRandAugment()
    img = photo(32, 40, seed=4)
    names = list(aug.ops)
    levels = [9.0 + 0.05 * i for i in range(len(names))]
    signs = [bool(i % 2) for i in range(len(names))]
    got = aug.apply(to_batch(*[img] * len(names)), RandAugmentParams.forced(aug.ops, names, level=levels, negate=signs))
    for i, name in enumerate(names):
        want = timm_op(name, img, level=levels[i], negate=signs[i], monkeypatch=monkeypatch)
        diff = np.abs(got[i].permute(1, 2, 0).numpy().astype(int) - want.astype(int))
        assert diff.max() <= (1 if name in GEOMETRIC else 0), name


@pytest.mark.parametrize("first, second", [("Rotate", "Equalize"), ("Equalize", "Rotate"),
                                           ("ShearX", "SolarizeAdd"), ("AutoContrast", "TranslateYRel"),
                                           ("ColorIncreasing", "ShearY"), ("ShearY", "ContrastIncreasing")])
def test_colour_and_geometric_ops_keep_their_order(first, second, monkeypatch):
    aug = BatchRandAugment()
    img = photo(40, 48, seed=5)
    want = timm_op(second, timm_op(first, img, level=8.5, negate=False, monkeypatch=monkeypatch),
                   level=8.5, negate=False, monkeypatch=monkeypatch)
    params = RandAugmentParams(op=torch.tensor([[aug.ops.index(first), aug.ops.index(second)]]),
                               applied=torch.ones(1, 2, dtype=torch.bool),
                               level=torch.full((1, 2), 8.5, dtype=torch.float64),
                               negate=torch.zeros(1, 2, dtype=torch.bool))
    got = aug.apply(to_batch(img), params)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got.astype(int) - want.astype(int))
    # A one-level difference from the warp could move through Equalize's table by a few levels.
    assert diff.mean() < 0.05 and np.mean(diff > 1) < 0.005, (first, second, diff.mean())


def test_two_geometric_ops_are_composed_into_one_sampling(monkeypatch):
    aug = BatchRandAugment()
    img = photo(48, 48, seed=6, noise=0.0)
    want = timm_op("ShearX", timm_op("Rotate", img, level=6.0, negate=True, monkeypatch=monkeypatch),
                   level=6.0, negate=False, monkeypatch=monkeypatch)
    params = RandAugmentParams(op=torch.tensor([[aug.ops.index("Rotate"), aug.ops.index("ShearX")]]),
                               applied=torch.ones(1, 2, dtype=torch.bool),
                               level=torch.full((1, 2), 6.0, dtype=torch.float64),
                               negate=torch.tensor([[True, False]]))
    got = aug.apply(to_batch(img), params)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got.astype(int) - want.astype(int))
    # One bicubic resampling instead of two: interpolation noise (mean 1.2 here; composing in
    # the wrong order gives 9), the same geometry and fill.
    assert diff.mean() < 2.0 and np.median(diff) <= 1
    fill_want = np.all(want == np.array(aug.fill), -1)
    fill_got = np.all(got == np.array(aug.fill), -1)
    assert np.mean(fill_want != fill_got) < 0.03


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_cpu_sampling_per_sample_and_along_one_axis_equals_the_batched_sampling(interpolation):
    # The CPU warps a sample at a time, along one axis where its maps keep rows or columns; CUDA
    # warps the whole batch in two dimensions. Both must give the same bytes.
    aug = BatchRandAugment(interpolation=interpolation)
    pairs = [(a, b) for a in GEOMETRIC for b in GEOMETRIC] + [(a, a) for a in GEOMETRIC]
    images = to_batch(*[photo(40, 56, seed=i) for i in range(len(pairs))])
    levels = torch.linspace(0.5, 10.0, len(pairs), dtype=torch.float64)
    chain = []
    for layer in range(2):
        names = torch.tensor([aug.ops.index(p[layer]) for p in pairs])
        negate = torch.arange(len(pairs)) % (2 + layer) == 0
        chain.append(aug._affine(names, torch.ones(len(pairs), dtype=torch.bool), levels - layer * 0.37,
                                 negate, 40, 56))
    for maps in (chain[:1], chain):
        every = torch.ones(len(pairs), dtype=torch.bool)
        batched = affine_sample(images, maps, fill=aug.fill, interpolation=interpolation)
        assert torch.equal(aug._warp_where(images.clone(), maps, every), batched)


def test_the_callers_batch_is_left_as_it_was():
    aug = BatchRandAugment()
    x = to_batch(*[photo(24, 24, seed=i) for i in range(len(aug.ops))])
    before = x.clone()
    out = aug.apply(x, RandAugmentParams.forced(aug.ops, list(aug.ops), level=9.0))
    assert torch.equal(x, before) and not torch.equal(out, before)


def test_unapplied_ops_leave_the_image_alone():
    aug = BatchRandAugment()
    x = to_batch(photo(24, 24))
    params = RandAugmentParams.forced(aug.ops, ["Rotate"], level=9.0)
    params = RandAugmentParams(op=params.op, applied=torch.zeros_like(params.applied), level=params.level,
                               negate=params.negate)
    assert torch.equal(aug.apply(x, params), x)


def test_draws_follow_timms_distributions():
    aug = BatchRandAugment()
    n = 40_000
    p = aug.draw(n, generator=augment_generator(seed=1, epoch=0, rank=0, step=0, device="cpu"))
    assert p.op.shape == (n, 2)
    counts = torch.bincount(p.op.flatten(), minlength=15).double()
    expected = 2 * n / 15
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 14 degrees of freedom: p < 1e-4
    assert abs(float(p.applied.double().mean()) - 0.5) < 0.01
    assert abs(float(p.negate.double().mean()) - 0.5) < 0.01
    level = p.level.flatten()
    assert float(level.min()) >= 0 and float(level.max()) <= 10
    # N(9, 0.5) clipped at 10: mean 9 - 0.0042, 2.28 % of the levels at exactly 10
    assert abs(float(level.mean()) - 8.9958) < 0.01
    assert abs(float((level == 10).double().mean()) - 0.0228) < 0.003
    inner = level[level < 10]  # N(9, 0.5) truncated at 2 sd above: sd 0.5 * 0.9415
    assert abs(float(inner.std()) - 0.4707) < 0.01


def test_applied_ops_change_images_as_often_as_drawn():
    aug = BatchRandAugment()
    x = to_batch(*[photo(16, 16, seed=s) for s in range(64)])
    gen = augment_generator(seed=2, epoch=0, rank=0, step=0, device="cpu")
    params = aug.draw(64, generator=augment_generator(seed=2, epoch=0, rank=0, step=0, device="cpu"))
    out = aug(x, generator=gen)
    untouched = ~params.applied.any(1)
    assert torch.equal(out[untouched], x[untouched])
    assert (out[~untouched] != x[~untouched]).flatten(1).any(1).float().mean() > 0.9


def test_magnitude_std_inf_draws_uniform_levels():
    aug = BatchRandAugment(magnitude=9, magnitude_std=float("inf"))
    level = aug.draw(20_000, generator=torch.Generator().manual_seed(0)).level
    assert abs(float(level.mean()) - 4.5) < 0.05 and float(level.max()) <= 9


def test_random_erasing_matches_torchvisions_statistics():
    n, size = 4000, 32
    ours = BatchRandomErasing(p=0.25)
    boxes = ours.draw(n, size, size, generator=torch.Generator().manual_seed(0))
    erased = boxes[:, 2] > 0
    areas = (boxes[erased, 2] * boxes[erased, 3]).double() / size**2
    ref = v2.RandomErasing(p=0.25, value="random")
    torch.manual_seed(0)
    ref_areas, ref_erased = [], 0
    for _ in range(n):
        out = ref(torch.zeros(3, size, size))
        area = int((out != 0).any(0).sum())
        ref_erased += area > 0
        if area:
            ref_areas.append(area / size**2)
    assert abs(float(erased.double().mean()) - 0.25) < 0.025
    assert abs(float(erased.double().mean()) - ref_erased / n) < 0.035
    assert abs(float(areas.mean()) - np.mean(ref_areas)) < 0.015
    assert 0.015 < float(areas.min()) and float(areas.max()) < 0.36
    h, w = boxes[erased, 2], boxes[erased, 3]
    assert bool(((boxes[erased, 0] + h <= size) & (boxes[erased, 1] + w <= size)).all())
    assert abs(float(torch.log(h.double() / w).mean())) < 0.1  # log-uniform aspect, symmetric


def test_random_erasing_fills_only_the_box_with_noise():
    images = torch.zeros(2, 3, 10, 12)
    boxes = torch.tensor([[2, 3, 4, 5], [0, 0, 0, 0]])
    noise = torch.randn(2, 3, 10, 12)
    out = BatchRandomErasing.apply(images, boxes, noise)
    assert torch.equal(out[0, :, 2:6, 3:8], noise[0, :, 2:6, 3:8])
    assert int((out[0] != 0).sum()) == 3 * 4 * 5
    assert torch.equal(out[1], images[1])


def test_no_rand_augment_no_erasing_equals_the_cpu_normalisation():
    x = to_batch(photo(20, 20), photo(20, 20, seed=1))
    cfg = Augment(rand_augment=None, random_erasing=0.0)
    got = BatchAugment.from_config(cfg)(x, generator=torch.Generator())
    want = torch.stack([cfg.build()(img) for img in x])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_augment_is_reproducible_per_step_and_feeds_mixup():
    aug = BatchAugment()
    x = to_batch(*[photo(32, 32, seed=s) for s in range(8)])
    def run(step):
        return aug(x, generator=augment_generator(seed=3, epoch=1, rank=0, step=step, device="cpu"))
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.dtype == torch.float32 and first.shape == (8, 3, 32, 32)
    batch = {"image": first, "label": torch.arange(8), "teacher": torch.full((8, 10), 0.1)}
    mixed = MixupCutmix(10, seed=0)(batch)
    assert mixed["image"].shape == first.shape and mixed["label"].shape == (8, 10)


def test_generators_differ_by_rank_and_epoch():
    draws = {(e, r): torch.rand(4, generator=augment_generator(seed=0, epoch=e, rank=r, step=0, device="cpu"))
             for e in (0, 1) for r in (0, 1)}
    values = [tuple(v.tolist()) for v in draws.values()]
    assert len(set(values)) == 4


@pytest.mark.gpu
def test_cuda_matches_cpu_for_forced_ops():
    aug = BatchRandAugment()
    img = to_batch(*[photo(40, 48, seed=s) for s in range(len(aug.ops))])
    params = RandAugmentParams.forced(aug.ops, list(aug.ops), level=8.7, negate=True)
    cpu = aug.apply(img, params)
    cuda = aug.apply(img.cuda(), RandAugmentParams(**{k: getattr(params, k).cuda()
                                                       for k in ("op", "applied", "level", "negate")}))
    assert int((cpu.int() - cuda.cpu().int()).abs().max()) <= 1

"""Stored augmentation (schema version 3): the draws, the pairing, the renderer and the record's
place in ``views.npy``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_sample
from deitpipe.shards.format import schema
from deitpipe.shards.format.augment import (
    MIX_NONE,
    RA_NONE,
    AugmentSpec,
    ViewRenderer,
    aug_dtype,
    draw_records,
    key_number,
    no_records,
    pair_group,
    records_of,
)
from deitpipe.shards.format.randaugment import BatchRandAugment, RandAugmentParams
from deitpipe.shards.format.reader import decode_sample, sample_schema_version
from deitpipe.shards.format.writer import encode_sample, npy_bytes

SIZE = 32
DEIT = AugmentSpec(size=SIZE, rand_augment=9, random_erasing=0.25, mixup=0.8, cutmix=1.0)
KEYS = [schema.sample_key(i) for i in range(200)]


def _draws(spec: AugmentSpec, keys=KEYS, *, seed: int = 0, views: int = 4) -> np.ndarray:
    """(len(keys), V + 1) records."""
    return np.stack([draw_records(spec, seed=seed, key=k, num_views=views) for k in keys])


# Draws ------------------------------------------------------------------------------------------


def test_a_views_record_is_a_pure_function_of_seed_key_and_view():
    four, eight = _draws(DEIT, KEYS[:20], views=4), _draws(DEIT, KEYS[:20], views=8)
    assert eight.dtype == aug_dtype() and aug_dtype().itemsize == 33
    np.testing.assert_array_equal(four, eight[:, :5])  # --views 4 holds the first 4 of --views 8
    np.testing.assert_array_equal(four, _draws(DEIT, KEYS[:20], views=4))
    other_seed = _draws(DEIT, KEYS[:20], seed=1, views=4)
    assert (other_seed[:, 1:] != four[:, 1:]).mean() > 0.9
    other_key = _draws(DEIT, KEYS[20:40], views=4)  # the same positions, other keys
    assert (other_key[:, 1:] != four[:, 1:]).mean() > 0.9
    np.testing.assert_array_equal(four[:, 0], np.broadcast_to(no_records(1)[0], (20,)))  # row 0: nothing


def test_rand_augment_draws_follow_timm():
    rec = _draws(AugmentSpec(size=SIZE, rand_augment=9, rand_augment_std=3.0), views=8)[:, 1:]
    ops = rec["ra_op"]
    assert ((ops == RA_NONE) | (ops < len(DEIT.ops))).all()
    assert abs((ops != RA_NONE).mean() - 0.5) < 0.05  # each op applied with p = 0.5
    assert len(np.unique(ops[ops != RA_NONE])) == len(DEIT.ops)
    level = rec["ra_level"]
    assert level.max() == 250 and level.min() < 200  # clipped to 10, noisy below
    assert abs(level.astype(float).mean() / 25 - 8.24) < 0.2  # E[min(N(9, 3), 10)]
    assert set(np.unique(rec["ra_sign"])) == {0, 1, 2, 3}
    fixed = _draws(AugmentSpec(size=SIZE, rand_augment=4, rand_augment_std=0.0))[:, 1:]
    assert (fixed["ra_level"] == 100).all()
    off = _draws(AugmentSpec(size=SIZE, mixup=0.8))[:, 1:]
    assert (off["ra_op"] == RA_NONE).all() and (off["erase"] == 0).all()


def test_erasing_boxes_lie_inside_the_view():
    rec = _draws(AugmentSpec(size=SIZE, random_erasing=1.0), views=4)[:, 1:].ravel()
    top, left, h, w = rec["erase"].T.astype(int)
    assert (h > 0).mean() > 0.95 and ((h > 0) == (w > 0)).all()
    assert (top + h <= SIZE).all() and (left + w <= SIZE).all()
    area = (h * w)[h > 0] / SIZE**2
    assert area.min() > 0.01 and area.max() < 0.4  # torchvision's scale (0.02, 0.33), rounded
    assert len(np.unique(rec["noise"])) == len(rec)
    some = _draws(AugmentSpec(size=SIZE, random_erasing=0.25), views=4)[:, 1:]
    assert abs((some["erase"][..., 2] > 0).mean() - 0.25) < 0.05


def test_cutmix_lambda_is_the_kept_area():
    rec = _draws(AugmentSpec(size=SIZE, cutmix=1.0), views=4)[:, 1:].ravel()
    top, left, h, w = rec["cut"].T.astype(int)
    pasted = h > 0
    assert pasted.mean() > 0.9 and (top + h <= SIZE).all() and (left + w <= SIZE).all()
    expected = np.float16(1 - h * w / SIZE**2)
    np.testing.assert_array_equal(rec["lam"], expected)
    assert (rec["lam"][~pasted] == 1).all()
    assert (rec["mix_key"] == MIX_NONE).all()  # partners come from pair_group


def test_mixup_alone_blends_and_the_switch_picks_one():
    mixup = _draws(AugmentSpec(size=SIZE, mixup=0.8), views=4)[:, 1:].ravel()
    assert (mixup["cut"] == 0).all()
    assert len(np.unique(mixup["lam"])) > 100 and 0 < mixup["lam"].min() and mixup["lam"].max() <= 1
    for switch, pasted in ((0.0, 0.0), (1.0, 1.0), (0.5, 0.5)):
        rec = _draws(AugmentSpec(size=SIZE, mixup=0.8, cutmix=1.0, mixup_switch=switch), views=4)[:, 1:].ravel()
        cut = rec["cut"][:, 2] > 0
        blend = ~cut & (rec["lam"] < 1)
        if pasted == 0.0:
            assert not cut.any()
        elif pasted == 1.0:
            assert not blend.any()  # CutMix only: a box, or nothing pasted (lam 1)
        else:
            assert 0.35 < cut.mean() < 0.65 and blend.any()


# Pairing ----------------------------------------------------------------------------------------


def _paired(keys, *, seed=0, views=4, spec=AugmentSpec(size=SIZE, mixup=0.8)) -> list[np.ndarray]:
    records = [draw_records(spec, seed=seed, key=k, num_views=views) for k in keys]
    pair_group(keys, records, seed=seed)
    return records


def test_partners_are_symmetric_within_the_group_and_the_same_view():
    keys = [schema.sample_key(i) for i in (40, 7, 93, 12, 5, 61, 30)]  # one group, in shard order
    records = _paired(keys)
    numbers = {key_number(k): n for n, k in enumerate(keys)}
    for v in range(1, 5):
        single = [n for n in range(len(keys)) if records[n][v]["mix_key"] == MIX_NONE]
        assert len(single) == 1  # an odd group leaves one view unmixed
        assert records[single[0]][v]["lam"] == 1 and (records[single[0]][v]["cut"] == 0).all()
        for n in range(len(keys)):
            if n in single:
                continue
            row = records[n][v]
            other = numbers[int(row["mix_key"])]
            assert other != n and row["mix_view"] == v
            assert records[other][v]["mix_key"] == key_number(keys[n])
        assert records[single[0]][0]["mix_key"] == MIX_NONE
    assert all(r[0]["mix_key"] == MIX_NONE for r in records)  # the global view never mixes
    # Each view pairs anew: not one fixed pairing for all views.
    assert len({tuple(int(r[v]["mix_key"]) for r in records) for v in range(1, 5)}) > 1


def test_an_even_group_mixes_every_view():
    records = _paired(KEYS[:16])
    assert all((r[1:]["mix_key"] != MIX_NONE).all() for r in records)


def test_pairing_depends_only_on_seed_keys_and_view():
    keys = KEYS[:16]
    pairs = lambda records, v: [int(r[v]["mix_key"]) for r in records]  # noqa: E731
    base = _paired(keys, views=4)
    longer = _paired(keys, views=8, spec=AugmentSpec(size=SIZE, mixup=0.8, cutmix=1.0, rand_augment=9))
    for v in range(1, 5):
        assert pairs(base, v) == pairs(longer, v) == pairs(_paired(keys, views=4), v)
    other_seed = _paired(keys, seed=1)
    assert any(pairs(other_seed, v) != pairs(base, v) for v in range(1, 5))
    other_keys = _paired(KEYS[16:32])
    shifted = [[k - 16 for k in pairs(other_keys, v)] for v in range(1, 5)]
    assert shifted != [pairs(base, v) for v in range(1, 5)]


# Rendering --------------------------------------------------------------------------------------


def _views(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def _normalised(views: torch.Tensor, spec: AugmentSpec = DEIT) -> torch.Tensor:
    mean = torch.tensor(spec.mean)[None, :, None, None]
    std = torch.tensor(spec.std)[None, :, None, None]
    return (views.float() / 255 - mean) / std


def test_a_record_that_does_nothing_renders_the_plain_normalisation():
    views = _views(3)
    out = ViewRenderer(DEIT)(views, no_records(3), [-1, -1, -1])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised(views), rtol=0, atol=0)


def test_erasing_fills_exactly_its_box_with_the_seeds_noise():
    views, rec = _views(2), no_records(2)
    rec[1]["erase"], rec[1]["noise"] = (3, 5, 7, 4), 1234
    renderer = ViewRenderer(DEIT)
    out = renderer(views, rec, [-1, -1])
    plain = _normalised(views)
    noise = torch.randn((3, 7, 4), generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(out[1, :, 3:10, 5:9], noise, rtol=0, atol=0)
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[3:10, 5:9] = False
    torch.testing.assert_close(out[1][:, outside], plain[1][:, outside], rtol=0, atol=0)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(renderer(views, rec, [-1, -1]), out, rtol=0, atol=0)  # reproducible


def test_mixup_blends_the_partners_augmented_pixels_with_lambda():
    views, rec = _views(3), no_records(3)
    for own, other, lam in ((0, 1, 0.3), (1, 0, 0.7)):
        rec[own]["mix_key"], rec[own]["mix_view"], rec[own]["lam"] = other, 1, lam
    rec[1]["erase"], rec[1]["noise"] = (0, 0, 6, 6), 7  # the partner's erasing shows in the blend
    out = ViewRenderer(DEIT)(views, rec, [1, 0, -1])
    erased = _normalised(views)
    erased[1, :, :6, :6] = torch.randn((3, 6, 6), generator=torch.Generator().manual_seed(7))
    lam = float(np.float16(0.3))
    torch.testing.assert_close(out[0], lam * erased[0] + (1 - lam) * erased[1])
    lam = float(np.float16(0.7))
    torch.testing.assert_close(out[1], lam * erased[1] + (1 - lam) * erased[0])
    torch.testing.assert_close(out[2], erased[2], rtol=0, atol=0)


def test_cutmix_pastes_the_partners_box():
    views, rec = _views(2), no_records(2)
    rec[0]["mix_key"], rec[0]["cut"], rec[0]["lam"] = 1, (4, 9, 10, 6), 1 - 60 / SIZE**2
    out = ViewRenderer(DEIT)(views, rec, [1, -1])
    plain = _normalised(views)
    torch.testing.assert_close(out[0, :, 4:14, 9:15], plain[1, :, 4:14, 9:15], rtol=0, atol=0)
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[4:14, 9:15] = False
    torch.testing.assert_close(out[0][:, outside], plain[0][:, outside], rtol=0, atol=0)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)


def test_rand_augment_from_a_record_is_the_batched_rand_augment():
    names = ("Rotate", "ShearX", "SolarizeIncreasing", "ColorIncreasing", "TranslateYRel", "PosterizeIncreasing")
    ops = [DEIT.ops.index(x) for x in names]
    rec = no_records(4)
    rec["ra_op"] = [(ops[0], ops[1]), (RA_NONE, ops[2]), (ops[3], ops[4]), (ops[5], RA_NONE)]
    rec["ra_level"] = [(225, 200), (0, 250), (175, 240), (100, 0)]
    rec["ra_sign"] = [0b10, 0b00, 0b01, 0b01]
    views = _views(4, seed=3)
    batched = BatchRandAugment(num_ops=2, magnitude=9, mean=DEIT.mean, interpolation="bicubic", ops=DEIT.ops)

    def params(negate) -> RandAugmentParams:
        return RandAugmentParams(
            op=torch.tensor([[ops[0], ops[1]], [0, ops[2]], [ops[3], ops[4]], [ops[5], 0]]),
            applied=torch.tensor([[True, True], [False, True], [True, True], [True, False]]),
            level=torch.tensor([[9.0, 8.0], [0.0, 10.0], [7.0, 9.6], [4.0, 0.0]], dtype=torch.float64),
            negate=torch.tensor(negate))

    expected = batched.apply(views, params([[False, True], [False, False], [True, False], [True, False]]))
    out = ViewRenderer(DEIT)(views, rec, [-1] * 4)
    torch.testing.assert_close(out, _normalised(expected), rtol=0, atol=0)
    swapped = batched.apply(views, params([[True, False], [False, False], [True, False], [True, False]]))
    assert not torch.equal(_normalised(swapped)[0], out[0])  # the sign bits reach their own op
    assert not torch.equal(out, _normalised(views))


# Schema -----------------------------------------------------------------------------------------


def _v3_sample(index: int = 3, views: int = 2) -> dict:
    args = make_sample(index, views=views)
    records = draw_records(DEIT, seed=0, key=args["key"], num_views=views)
    partner = draw_records(DEIT, seed=0, key=schema.sample_key(index + 1), num_views=views)
    pair_group([args["key"], schema.sample_key(index + 1)], [records, partner], seed=0)
    args["views"] = {**args["views"], **{name: records[name] for name in schema.AUG_FIELD_NAMES}}
    return args


def test_version_3_round_trips_every_field():
    args = _v3_sample()
    raw = {"__key__": args["key"], **{k: v for k, v in encode_sample(**args).items() if k != "__key__"}}
    assert sample_schema_version(raw) == 3
    out = decode_sample(raw)
    for name, arr in args["views"].items():
        np.testing.assert_array_equal(out[name], arr, err_msg=name)
        assert out[name].dtype == arr.dtype, name
    rec = records_of(out)
    assert rec.dtype == aug_dtype()
    for name in schema.AUG_FIELD_NAMES:
        np.testing.assert_array_equal(rec[name], args["views"][name])
    assert (rec[1:]["mix_key"] == 4).all() and (rec[1:]["ra_op"] != RA_NONE).any()
    stored = np.load(io.BytesIO(raw[schema.VIEWS]), allow_pickle=False)
    assert stored.dtype.names == schema.VIEW_FIELDS + schema.AUG_FIELD_NAMES
    assert stored.dtype.itemsize == schema.bytes_per_view(10, 3, False, augment=True)


def test_a_view_with_its_record_is_94_bytes_at_top_10():
    assert schema.bytes_per_view(1000, 10, False) == 61
    assert schema.bytes_per_view(1000, 10, False, augment=True) == 94
    assert schema.bytes_per_view(65536, 10, False, augment=True) == 94
    assert schema.bytes_per_view(65537, 10, False, augment=True) == 94 + 2 * 11
    with_softmax = schema.views_dtype(1000, 10, True, augment=True)
    assert with_softmax.names[-1] == "softmax" and with_softmax.itemsize == 94 + 2000


def test_a_partial_record_is_refused_by_writer_and_reader():
    args = _v3_sample()
    partial = dict(args, views={k: v for k, v in args["views"].items() if k != "lam"})
    with pytest.raises(ValueError, match="needs all of"):
        encode_sample(**partial)
    with pytest.raises(ValueError, match="version 3"):
        encode_sample(**make_sample(1), schema_version=3)
    with pytest.raises(ValueError, match="needs all of"):
        encode_sample(**args, schema_version=2)
    narrow = dict(args, views={**args["views"], "erase": args["views"]["erase"][:, :1]})
    with pytest.raises(ValueError, match=r"s000000003: .*'erase': \(3, 1\)"):
        encode_sample(**narrow)  # not broadcast into four equal values
    raw = encode_sample(**args)
    rows = np.load(io.BytesIO(raw[schema.VIEWS]), allow_pickle=False)
    kept = [n for n in rows.dtype.names if n != "noise"]
    raw[schema.VIEWS] = npy_bytes(np.ascontiguousarray(rows[kept]).copy())
    with pytest.raises(ValueError, match="augmentation record"):
        decode_sample(raw)


def test_versions_1_2_and_3_all_decode():
    v3 = _v3_sample(5)
    plain = {k: v3["views"][k] for k in schema.VIEW_FIELDS}
    raws = {1: encode_sample(**dict(v3, views=plain), schema_version=1),
            2: encode_sample(**dict(v3, views=plain)),
            3: encode_sample(**v3)}
    decoded = {}
    for version, raw in raws.items():
        assert sample_schema_version(raw) == version
        decoded[version] = decode_sample(raw)
    for name in schema.VIEW_FIELDS:
        for version in (1, 2):
            np.testing.assert_array_equal(decoded[version][name], decoded[3][name])
    assert records_of(decoded[1]) is None and records_of(decoded[2]) is None
    assert records_of(decoded[3]) is not None


def test_shards_md_lists_the_record_as_the_schema_defines_it():
    doc = (Path(__file__).parents[1] / "SHARDS.md").read_text()
    section = doc.split("### Version 3")[1].split("\n\n**Drawing**")[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| `")]
    assert [name.strip().strip("`") for name, _, _ in rows] == list(schema.AUG_FIELD_NAMES)
    words = {"u1": "uint8", "<u2": "uint16", "<u4": "uint32", "<f2": "float16"}
    for (_, _, dtype), (name, kind, shape) in zip(rows, schema.AUG_FIELDS):
        written = dtype.strip()
        assert words[kind] in written and written.startswith(f"`{shape}`") == bool(shape), name
    assert "94 with the augmentation record" in doc and schema.bytes_per_view(1000, 10, False, augment=True) == 94


def test_mixing_a_row_at_a_time_equals_the_batched_pass():
    """The CPU's row loop and CUDA's batched pass give the same values, bit for bit."""
    from deitpipe.shards.format.augment import _mix_batched, _mix_rows

    spec = AugmentSpec(size=24, mixup=0.8, cutmix=1.0)
    keys = [f"s{i:09d}" for i in range(6)]
    records = [draw_records(spec, seed=3, key=k, num_views=4) for k in keys]
    pair_group(keys, records, seed=3)
    rows = np.stack([r[2] for r in records])
    where = {int(k[1:]): i for i, k in enumerate(keys)}
    partner = np.asarray([where.get(int(r["mix_key"]), -1) for r in rows])
    images = torch.randn(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    mixed = np.flatnonzero(partner >= 0)
    assert len(mixed) == 6 and (rows["cut"][:, 2] > 0).any() and (rows["cut"][:, 2] == 0).any()
    assert torch.equal(_mix_rows(images, rows, partner, mixed), _mix_batched(images, rows, partner, mixed))

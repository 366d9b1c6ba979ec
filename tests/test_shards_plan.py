"""Planning invariants: inputs into shards, shard order per epoch and rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from deitpipe.shards.format.plan import epoch_sample_order, epoch_shard_order, plan_shards


@pytest.mark.parametrize("n, size", [(0, 3), (1, 1), (10, 3), (9, 3), (7, 100), (1797, 256)])
def test_every_index_in_exactly_one_contiguous_shard(n, size):
    plan = plan_shards(n, size)
    flat = [i for r in plan for i in r]
    assert flat == list(range(n))
    assert all(1 <= len(r) <= size for r in plan)
    assert all(len(r) == size for r in plan[:-1])
    assert plan == plan_shards(n, size)


def test_plan_rejects_bad_shard_size():
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(10, 0)


SHARDS = [f"shard-{i:06d}.tar" for i in range(10)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 8, 10])
def test_epoch_order_pads_equal_counts_and_covers_all(world, n):
    shards = SHARDS[:n]
    parts = [epoch_shard_order(shards=shards, seed=0, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    assert len(parts[0]) == -(-n // world)
    counts = Counter(s for p in parts for s in p)
    assert set(counts) == set(shards)  # no data lost
    assert sum(counts.values()) - n == len(parts[0]) * world - n  # only the padding repeats
    if n % world == 0:
        assert all(c == 1 for c in counts.values())  # disjoint
    for p in parts:
        assert len(set(p)) == len(p) or n < world  # a rank never reads a shard twice unless n < world


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_epoch_order_drop_last_is_disjoint(world):
    parts = [epoch_shard_order(shards=SHARDS, seed=0, epoch=0, rank=r, world_size=world, drop_last=True)
             for r in range(world)]
    flat = [s for p in parts for s in p]
    assert len(flat) == len(set(flat)) == (10 // world) * world
    assert len({len(p) for p in parts}) == 1


def test_epoch_order_changes_with_epoch_and_is_pure():
    orders = [tuple(epoch_shard_order(shards=SHARDS, seed=0, epoch=e, rank=0, world_size=1)) for e in range(5)]
    assert len(set(orders)) == 5
    assert all(sorted(o) == SHARDS for o in orders)
    assert orders[3] == tuple(epoch_shard_order(shards=SHARDS, seed=0, epoch=3, rank=0, world_size=1))
    assert orders[0] != tuple(epoch_shard_order(shards=SHARDS, seed=1, epoch=0, rank=0, world_size=1))


def test_epoch_order_validates_rank():
    with pytest.raises(ValueError, match="rank"):
        epoch_shard_order(shards=SHARDS, seed=0, epoch=0, rank=2, world_size=2)
    assert epoch_shard_order(shards=[], seed=0, epoch=0, rank=0, world_size=2) == []


def test_epoch_sample_order_is_a_seeded_permutation():
    a = epoch_sample_order(num_samples=50, seed=0, epoch=1, shard="shard-000000.tar")
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_sample_order(num_samples=50, seed=0, epoch=1, shard="shard-000000.tar"))
    assert not np.array_equal(a, epoch_sample_order(num_samples=50, seed=0, epoch=2, shard="shard-000000.tar"))
    assert not np.array_equal(a, epoch_sample_order(num_samples=50, seed=0, epoch=1, shard="shard-000001.tar"))


def test_assign_shards_mixes_and_covers_every_input_once():
    from deitpipe.shards.format.plan import assign_shards

    plan = assign_shards(100, 30, seed=3)
    assert [len(p) for p in plan] == [30, 30, 30, 10]
    flat = [i for p in plan for i in p]
    assert sorted(flat) == list(range(100))
    assert assign_shards(100, 30, seed=3) == plan
    assert assign_shards(100, 30, seed=4) != plan
    # sorted inputs of 10 classes (10 each): every full shard holds many classes
    assert all(len({i // 10 for i in p}) >= 6 for p in plan[:3])

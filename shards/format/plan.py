"""Planning as pure functions: inputs into shards, and the shard and sample order per epoch."""

from __future__ import annotations

import zlib

import numpy as np


def plan_shards(num_samples: int, shard_size: int) -> list[range]:
    """Split the sorted input list into contiguous shards.

    Args:
        num_samples: Number of inputs (their indices in the sorted input list are 0..n-1).
        shard_size: Samples per shard; the last shard holds the remainder.

    Returns:
        Contiguous ranges of sample indices; every index is in exactly one range.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def epoch_shard_order(
    *,
    shards: list[str],
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    drop_last: bool = False,
) -> list[str]:
    """The shards one rank reads in one epoch.

    The shard list is permuted by ``(seed, epoch)`` (the same permutation on every rank) and dealt
    round-robin: rank ``r`` gets positions ``r, r + world_size, ...``. All ranks get the same
    number of shards, so distributed training steps stay in lockstep. When the count does not
    divide, the default pads by repeating the first shards of the permutation (no data is lost;
    a few shards are seen twice that epoch, each by a different rank); ``drop_last`` instead
    drops the last shards of the permutation (ranks are then disjoint, the dropped shards change
    with the epoch).

    Args:
        shards: Shard names or URLs, in manifest order.
        seed: Run seed.
        epoch: Epoch number.
        rank: This process's rank.
        world_size: Number of ranks.
        drop_last: Drop instead of pad.

    Returns:
        This rank's shards in reading order.
    """
    _check_rank(rank, world_size)
    n = len(shards)
    if n == 0:
        return []
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    per_rank = n // world_size if drop_last else -(-n // world_size)
    total = per_rank * world_size
    # np.resize repeats from the start, which also covers world_size > n.
    order = perm[:total] if total <= n else np.resize(perm, total)
    return [shards[i] for i in order[rank::world_size]]


def epoch_sample_order(*, num_samples: int, seed: int, epoch: int, shard: str) -> np.ndarray:
    """A permutation of the samples inside one shard for one epoch.

    Args:
        num_samples: Samples in the shard.
        seed: Run seed.
        epoch: Epoch number.
        shard: Shard name (hashed, so each shard gets its own order).

    Returns:
        (num_samples,) int64 permutation of ``0..num_samples-1``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    ss = np.random.SeedSequence([seed, epoch, zlib.crc32(shard.encode("utf-8"))])
    return np.random.default_rng(ss).permutation(num_samples)


def assign_shards(num_samples: int, shard_size: int, *, seed: int) -> list[list[int]]:
    """Assign the sorted inputs to shards in a seeded random order, so that every shard mixes classes.

    Inputs come sorted (an ImageFolder is sorted by class), and a reader shuffles only within the
    few shards it holds at a time: shards cut from the sorted list would give batches of one or
    two classes. Shard ``s`` holds positions ``plan_shards(...)[s]`` of one permutation.

    Args:
        num_samples: number of inputs (indices 0..n-1 in sorted order).
        shard_size: inputs per shard; the last shard holds the remainder.
        seed: seed of the permutation.
    Returns:
        Per shard, its input indices in writing order; every index is in exactly one shard.
    """
    order = np.random.default_rng(np.random.SeedSequence([seed, _ASSIGN_TAG])).permutation(num_samples)
    return [order[r.start:r.stop].tolist() for r in plan_shards(num_samples, shard_size)]


_ASSIGN_TAG = 0xA55164

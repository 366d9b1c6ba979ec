"""The batched loader on shards that store each view's whole augmentation (schema version 3).

``EncodedShardReplay`` yields, besides a sample's encoded view, the view's augmentation record
(:func:`record_fields`: one tensor per field, so the loader's collation stacks them) and its
mixing partner's encoded view and record under ``partner_`` names. Partners are yielded next to
each other, but a pair may straddle two batches: :func:`with_partners` looks each partner up in
the batch by (key, view) and appends, once each, those that are not there, so that one
``decode_and_cut`` cuts them all; :func:`render_stored` then renders every row with the label
set's ``ViewRenderer``, the function label-teacher and ``ShardReplay`` render with, and keeps the
batch's own rows. Replay is exact: the pixels differ from ``ShardReplay``'s only by the batched
cut's rounding (and, on CUDA, nvJPEG's decoding).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deitpipe.shards.format.augment import MIX_NONE, ViewRenderer, key_number, stack_records
from deitpipe.shards.format.randaugment import BatchAugment
from deitpipe.shards.format.schema import AUG_FIELD_NAMES

PARTNER = "partner_"  # prefix of the mixing partner's fields in a sample
CUT_FIELDS = ("data", "key", "jpeg", "orientation", "box", "flip")  # what decode_and_cut reads


def record_fields(record: np.void, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """One augmentation record as tensors a DataLoader stacks.

    Args:
        record: a row of ``shards.format.augment.aug_dtype``.
        prefix: put before each field's name.
    Returns:
        ``prefix + name`` -> int64 tensor per field ((2,) or (4,) for the array fields), "lam" float32.
    """
    out = {}
    for name in AUG_FIELD_NAMES:
        value = np.asarray(record[name])
        kind = np.float32 if value.dtype.kind == "f" else np.int64
        out[prefix + name] = torch.from_numpy(np.array(value, dtype=kind))
    return out


def with_partners(batch: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The views to cut for a batch with records: its own, then each partner not in the batch.

    Args:
        batch: from ``gpu_replay.collate`` over samples with records and partners.
    Returns:
        ``(cut, records, partner)``: ``cut`` holds ``decode_and_cut``'s fields for the B samples
        followed by the E partners found nowhere in the batch (each once); ``records`` (B + E,)
        their records; ``partner`` (B + E,) each row's partner row, -1 where not mixed (the E
        partners only lend their pixels).
    """
    records = stack_records(batch)
    rows = {(key_number(k), v): i for i, (k, v) in enumerate(zip(batch["key"], batch["view"].tolist()))}
    partner = np.full(len(records), -1, dtype=np.int64)
    extra: list[int] = []  # samples whose carried partner is cut too
    for i, rec in enumerate(records):
        if int(rec["mix_key"]) == MIX_NONE:
            continue
        want = (int(rec["mix_key"]), int(rec["mix_view"]))
        if want not in rows:
            rows[want] = len(records) + len(extra)
            extra.append(i)
        partner[i] = rows[want]
    if not extra:
        return {name: batch[name] for name in CUT_FIELDS}, records, partner
    lent = {name: _rows(batch[PARTNER + name], extra) for name in CUT_FIELDS + AUG_FIELD_NAMES}
    cut = {name: _join(batch[name], lent[name]) for name in CUT_FIELDS}
    records = np.concatenate([records, stack_records(lent)])
    return cut, records, np.concatenate([partner, np.full(len(extra), -1, dtype=np.int64)])


def _rows(column: torch.Tensor | list, index: list[int]) -> torch.Tensor | list:
    return [column[i] for i in index] if isinstance(column, list) else column[index]


def _join(first: torch.Tensor | list, second: torch.Tensor | list) -> torch.Tensor | list:
    return first + second if isinstance(first, list) else torch.cat([first, second])


def render_stored(views: torch.Tensor, records: np.ndarray, partner: np.ndarray, *, keep: int,
                  renderer: ViewRenderer, augment: BatchAugment | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Render the cut views under their records and keep the batch's own rows.

    ``augment`` is what the training run adds on top of the stored augmentation, as
    ``ShardReplay`` does: its RandAugment on the uint8 views before the stored one, its erasing
    after the rendering; a ``BatchAugment`` with both off (train-student's default on these
    shards), like None, adds nothing, and its normalisation is never used (the records' pixels
    are in the label set's mean and std).

    Args:
        views: (B + E, 3, S, S) uint8 from ``decode_and_cut`` over :func:`with_partners`'s cut.
        records, partner: from :func:`with_partners`.
        keep: B, the batch's own rows (the first).
        renderer: the label set's ``ViewRenderer``.
        augment: the extra augmentation, or None.
        generator: the extra augmentation's draws.
    Returns:
        (B, 3, S, S) float32 normalised with the label set's mean and std.
    """
    extra_ra = augment.rand_augment if augment is not None else None
    extra_erase = augment.erasing if augment is not None else None
    if extra_ra is not None:
        views = extra_ra(views, generator=generator)
    images = renderer(views, records, partner)[:keep]
    return extra_erase(images, generator=generator) if extra_erase is not None else images


__all__ = ["CUT_FIELDS", "PARTNER", "record_fields", "render_stored", "with_partners"]

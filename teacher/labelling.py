"""Stage one's core: cut every image's views, let the teacher label them, pack the shards.

Nothing here knows Ray. The inputs of a run are split into *chunks*: consecutive inputs in shard
order, as many as one teacher forward pass takes (``batch_size // (V + 1)`` images). A chunk is
the unit of work of every launcher: :func:`decode_chunk` reads, decodes and cuts its views,
:class:`ViewTeacher` labels them, and :class:`ShardPacker` collects the labelled rows and packs
each shard as soon as its inputs are all seen. Because the teacher always sees the same chunks,
whoever runs them (:func:`label_local` in this process, or Ray Data over a cluster), the shards
come out the same, byte for byte.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deitpipe.shards import storage
from deitpipe.shards.format import schema
from deitpipe.shards.format.augment import AugmentSpec, draw_records, no_records, pair_group
from deitpipe.shards.format.image import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    cut_views,
    decode_image,
    upsample_views,
    sniff_image_type,
    storable_image,
)
from deitpipe.shards.format.manifest import write_manifest
from deitpipe.shards.inputs import Candidate, Source, read_bytes
from deitpipe.shards.format.views import global_box, random_view_boxes
from deitpipe.shards.format.writer import ShardFileWriter, encode_sample
from deitpipe.teacher.predict import TeacherPredictor
from deitpipe.teacher.preprocess import Preprocessing

OUTPUT_MEMBERS = ("hard", "topk", "prob", "rest", "softmax")
_READERS = 16  # a shard's source images read at once (ranged GETs, when they lie in object storage)


class LabelError(RuntimeError):
    """A user-facing failure of label-teacher; its message is one line."""


def image_views(
    data: bytes, *, key: str, seed: int, views: int, prep: Preprocessing, min_scale: float = 0.08,
    max_pixels: int | None = DEFAULT_MAX_PIXELS, view_size: int | None = None, augment: AugmentSpec | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Decode one image and cut its global view plus ``views`` random views at the teacher's size.

    With ``view_size`` the views are cut at that size (the student's input) and then resized to
    the teacher's (``shards.format.image.upsample_views``): the teacher labels the student's exact
    pixels, larger.

    Args:
        data: the image file's bytes.
        key: the sample key, which seeds its random views.
        seed: run seed.
        views: number of random views V.
        prep: teacher preprocessing (resize, crop, interpolation).
        min_scale: smallest crop area of a random view.
        max_pixels: larger images are refused as decompression bombs.
        view_size: the side views are cut at (None: the teacher's crop).
        augment: draw each random view's augmentation record too; the views are then cut at
            ``augment.size`` and left at that size (:class:`ViewTeacher` renders and resizes them).
    Returns:
        ``({"height", "width", "box" (V+1, 4), "flip" (V+1,)[, "aug" (V+1,) records]},
        pixels (V+1, 3, S, S) uint8)``.
    Raises:
        ImageDecodeError: the bytes are not a decodable image.
    """
    img = decode_image(data, max_pixels=max_pixels)
    width, height = img.size
    boxes, flips = random_view_boxes(seed=seed, key=key, num_views=views, height=height, width=width,
                                     scale=(min_scale, 1.0))
    g = global_box(height=height, width=width, resize=prep.resize, crop=prep.crop)
    boxes = np.concatenate([np.asarray([g], dtype=schema.BOX_DTYPE), boxes])  # (V+1, 4)
    flips = np.concatenate([np.zeros(1, dtype=schema.FLIP_DTYPE), flips])  # (V+1,)
    geo = {"height": height, "width": width, "box": boxes, "flip": flips}
    if augment is not None:
        geo["aug"] = draw_records(augment, seed=seed, key=key, num_views=views)
        return geo, cut_views(img, boxes, flips, augment.size, interpolation=augment.cut_interpolation).numpy()
    pixels = cut_views(img, boxes, flips, view_size or prep.crop, interpolation=prep.interpolation)
    return geo, upsample_views(pixels, prep.crop).numpy()


def chunk_plan(plan: list[list[int]], todo: list[int], *, views: int, batch_size: int,
               mix_group: int | None = None) -> list[list[int]]:
    """The chunks of a run: the inputs of the shards in ``todo``, in shard order, cut into runs of
    ``max(1, batch_size // (views + 1))``, so that a chunk's views fill one teacher pass.

    With ``mix_group`` (views mixed with a partner), a chunk is instead one or more whole groups
    of that many consecutive inputs of one shard, the groups partners are drawn in: a group
    never spans two chunks or two shards."""
    per_chunk = max(1, batch_size // (views + 1))
    if mix_group is None:
        order = [i for s in todo for i in plan[s]]
        return [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    step = max(1, per_chunk // mix_group) * mix_group
    return [plan[s][i:i + step] for s in todo for i in range(0, len(plan[s]), step)]


def chunk_items(source: Source, indices: list[int]) -> list[dict[str, Any]]:
    """What a worker needs to read the inputs ``indices`` (plain values, cheap to ship)."""
    cands = source.candidates
    return [{"index": i, "path": cands[i].path, "label": cands[i].label, "kind": cands[i].kind,
             "ref": cands[i].ref, "size": cands[i].size, "data": cands[i].data, "offset": cands[i].offset,
             "length": cands[i].length} for i in indices]


def _candidate(item: dict[str, Any]) -> Candidate:
    data = item["data"]
    return Candidate(path=str(item["path"]), label=int(item["label"]), kind=str(item["kind"]), ref=str(item["ref"]),
                     size=int(item["size"]), data=bytes(data) if data is not None else None,
                     offset=int(item["offset"]), length=int(item["length"]))


def decode_chunk(items: list[dict[str, Any]], *, seed: int, views: int, prep: dict[str, Any], min_scale: float = 0.08,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, view_size: int | None = None,
                 augment: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Read and decode a chunk's images and cut their views; an undecodable one comes back with
    ``ok`` False and its reason.

    With ``augment`` (an :class:`AugmentSpec` as a dict), each view's record is drawn too, one
    column per field (``schema.AUG_FIELD_NAMES``, (n, V+1, ...)), partners paired inside each
    group of ``mix_group`` consecutive items (:func:`chunk_plan` keeps groups whole), and the
    views stay at ``augment["size"]``.

    Returns:
        ``{"index", "ok", "reason", "height", "width", "box" (n, V+1, 4), "flip" (n, V+1),
        "pixels" (n, V+1, 3, S, S) uint8[, record fields]}``.
    """
    prep_ = Preprocessing.from_dict(prep)
    spec = AugmentSpec.from_dict(augment) if augment else None
    n, s = len(items), (spec.size if spec else prep_.crop)
    out = {
        "index": np.asarray([int(it["index"]) for it in items], dtype=np.int64), "ok": np.zeros(n, dtype=bool),
        "reason": np.full(n, "", dtype=object),
        "height": np.zeros(n, dtype=np.int64), "width": np.zeros(n, dtype=np.int64),
        "box": np.zeros((n, views + 1, 4), dtype=schema.BOX_DTYPE),
        "flip": np.zeros((n, views + 1), dtype=schema.FLIP_DTYPE),
        "pixels": np.zeros((n, views + 1, 3, s, s), dtype=np.uint8),
    }
    records: dict[int, np.ndarray] = {}
    for i, item in enumerate(items):
        try:
            geo, pixels = image_views(read_bytes(_candidate(item)), key=schema.sample_key(int(item["index"])),
                                      seed=seed, views=views, prep=prep_, min_scale=min_scale, max_pixels=max_pixels,
                                      view_size=view_size, augment=spec)
        except (ImageDecodeError, OSError) as exc:
            out["reason"][i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        out["ok"][i] = True
        for k in ("height", "width", "box", "flip"):
            out[k][i] = geo[k]
        out["pixels"][i] = pixels
        if spec is not None:
            records[i] = geo["aug"]
    if spec is not None:
        _pair_and_store(out, records, spec, seed=seed, views=views)
    return out


def _pair_and_store(out: dict[str, np.ndarray], records: dict[int, np.ndarray], spec: AugmentSpec, *,
                    seed: int, views: int) -> None:
    """Pair the decoded items' views inside each mix group, then store the records as columns."""
    n = len(out["index"])
    if spec.mixes:
        for start in range(0, n, spec.mix_group):
            members = [i for i in range(start, min(start + spec.mix_group, n)) if i in records]
            pair_group([schema.sample_key(int(out["index"][i])) for i in members], [records[i] for i in members],
                       seed=seed)
    blank = no_records(views + 1)
    table = np.stack([records.get(i, blank) for i in range(n)]) if n else np.zeros((0, views + 1), blank.dtype)
    for name in schema.AUG_FIELD_NAMES:
        out[name] = np.ascontiguousarray(table[name])


class ViewTeacher:
    """The teacher over all views of a decoded chunk, (n, V+1, 3, S, S) -> per-view outputs.

    With ``augment`` (the label set's :class:`AugmentSpec` as a dict) the chunk's views are first
    rendered under their records (``shards.format.augment.ViewRenderer``, the function both student
    loaders replay them with) on the teacher's device, then resized to the teacher's input: the
    teacher labels the student's final pixels.

    Args:
        cpu_threads: torch threads of a teacher on the CPU (None: torch's default).
        augment: the stored augmentation, or None (crop and flip only).
        predictor_kwargs: :class:`TeacherPredictor`'s arguments (teacher name, weights path, ...).
    """

    def __init__(self, *, cpu_threads: int | None = None, augment: dict[str, Any] | None = None,
                 **predictor_kwargs: Any) -> None:
        if cpu_threads:
            import torch

            torch.set_num_threads(cpu_threads)
        self.predictor = TeacherPredictor(**predictor_kwargs)
        self.renderer = None
        if augment:
            from deitpipe.shards.format.augment import ViewRenderer

            self.renderer = ViewRenderer(AugmentSpec.from_dict(augment))

    @property
    def renders_ahead(self) -> bool:
        """Whether :meth:`render` may run ahead in a decoding thread: a CPU teacher with stored
        augmentation (on a GPU the views are rendered on the teacher's device, beside it)."""
        return self.renderer is not None and self.predictor.device.type == "cpu"

    def render(self, chunk: dict[str, np.ndarray]) -> dict[str, Any]:
        """The chunk with its views rendered under their records and resized to the teacher's
        input ("rendered": one (views, n, 3, crop, crop) float tensor a teacher pass) in place of
        "pixels". Slices are view-major (every image's view v together, so each partner is in
        the slice)."""
        import torch

        from deitpipe.shards.format.augment import MIX_NONE, stack_records

        chunk = dict(chunk)
        pixels = chunk.pop("pixels")  # (n, V+1, 3, S, S)
        n, v = pixels.shape[:2]
        records = stack_records(chunk)  # (n, V+1)
        position = {int(index): b for b, index in enumerate(chunk["index"])}
        spec, device = self.renderer.spec, self.predictor.device
        crop = self.predictor.info.preprocessing.crop
        views_per_pass = max(1, self.predictor.batch_size // max(n, 1))
        chunk["rendered"] = []
        for first in range(0, v, views_per_pass):
            cols = range(first, min(first + views_per_pass, v))
            rec = np.concatenate([records[:, c] for c in cols])  # view-major: row (c - first) * n + b
            partner = np.asarray([-1 if r["mix_key"] == MIX_NONE else (c - first) * n + position[int(r["mix_key"])]
                                  for c in cols for r in records[:, c]], dtype=np.int64)
            views = torch.from_numpy(np.ascontiguousarray(pixels[:, first:cols.stop].swapaxes(0, 1))).to(device)
            out = self.renderer(views.reshape(-1, *views.shape[2:]), rec, partner)
            unit = rendered_teacher_input(out, mean=spec.mean, std=spec.std, crop=crop)
            chunk["rendered"].append(unit.view(len(cols), n, *unit.shape[1:]))
        return chunk

    def __call__(self, chunk: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.renderer is not None:
            chunk = chunk if "rendered" in chunk else self.render(chunk)
            chunk = dict(chunk)
            rendered = chunk.pop("rendered")  # (views, n, 3, crop, crop) a pass
            n, v = len(chunk["index"]), sum(len(unit) for unit in rendered)
            labelled = self._label_rendered(rendered)
        else:
            chunk = dict(chunk)
            pixels = chunk.pop("pixels")  # (n, V+1, 3, S, S)
            n, v = pixels.shape[:2]
            labelled = self.predictor({"pixels": pixels.reshape(n * v, *pixels.shape[2:])})
        for k in OUTPUT_MEMBERS:
            if k in labelled:
                chunk[k] = labelled[k].reshape(n, v, *labelled[k].shape[1:])
        return chunk

    def _label_rendered(self, rendered: list) -> dict[str, np.ndarray]:
        """Label rendered passes (each (views, n, 3, crop, crop)); rows come back image-major."""
        import torch

        probs = [self.predictor.probs(unit.flatten(0, 1)).view(*unit.shape[:2], -1).transpose(0, 1)
                 for unit in rendered]
        return self.predictor.summarize(torch.cat(probs, 1).reshape(-1, probs[0].shape[-1]))


def rendered_teacher_input(images, *, mean, std, crop: int):
    """What the teacher is given for rendered views: (B, 3, S, S) normalised with ``mean`` and
    ``std`` (the label set's) back to [0, 1] units, resized to its ``crop`` as floats, bilinear
    (the teacher then normalises its own way). label-teacher labels with it and
    ``inspect --check-teacher`` checks with it."""
    import torch

    mean_ = torch.tensor(mean, device=images.device)[None, :, None, None]
    std_ = torch.tensor(std, device=images.device)[None, :, None, None]
    unit = images * std_ + mean_
    if unit.shape[-1] == crop and unit.shape[-2] == crop:
        return unit
    return torch.nn.functional.interpolate(unit, size=(crop, crop), mode="bilinear", align_corners=False)


def pack_shard(*, out_dir: Path, shard: int, order: list[int], first_index: int, source: Source,
               rows: dict[int, dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Write one shard from its labelled rows (index -> row), in its planned order.

    Returns:
        Its manifest entry; ``first_index`` is the position of its first input in the
        assignment order (``shards.format.plan.assign_shards``).
    """
    indices = [i for i in order if i in rows]
    with ShardFileWriter(out_dir, schema.shard_name(shard)) as writer, \
            ThreadPoolExecutor(max_workers=_READERS) as readers:
        # Images in object storage are one ranged GET each: many in flight, written in order.
        for index, data in zip(indices, readers.map(lambda i: read_bytes(source.candidates[i]), indices)):
            row, cand = rows[index], source.candidates[index]
            ext = sniff_image_type(data)
            # Types the schema does not list are stored as PNG of the same pixel grid.
            image_bytes, ext = (data, ext) if ext else storable_image(data, decode_image(data))
            views = {"box": row["box"], "flip": row["flip"]}
            views.update({k: row[k] for k in OUTPUT_MEMBERS + schema.AUG_FIELD_NAMES if k in row})
            writer.write(encode_sample(
                key=schema.sample_key(index), image_bytes=image_bytes, image_ext=ext, label=cand.label,
                meta={"path": cand.path, "height": int(row["height"]), "width": int(row["width"])},
                views=views, num_classes=num_classes,
            ))
    unlabeled = sum(source.candidates[i].label < 0 for i in indices)
    return {**writer.record(), "first_index": first_index, "unlabeled": unlabeled}


def pack(*, out: str, shard: int, plan: list[list[int]], source: Source, rows: dict[int, dict[str, Any]],
         skipped: list[dict[str, str]], num_classes: int) -> dict[str, Any]:
    """Pack one shard into ``out``; into object storage, it is packed in a local temporary
    directory and uploaded whole (``storage.upload``) before the manifest lists it."""
    first = sum(len(p) for p in plan[:shard])
    args = dict(shard=shard, order=plan[shard], first_index=first, source=source, rows=rows, num_classes=num_classes)
    if storage.is_object_uri(out):
        with tempfile.TemporaryDirectory(prefix="deitpipe-shard-") as staging:
            entry = pack_shard(out_dir=Path(staging), **args)
            storage.upload(Path(staging) / entry["name"], storage.join(out, entry["name"]))
    else:
        entry = pack_shard(out_dir=Path(out), **args)
    return {**entry, "candidates": len(plan[shard]), "skipped": skipped}


class ShardPacker:
    """Collects labelled rows and packs each shard, in a thread beside the stream, once all its
    inputs are seen; every packed shard is added to the manifest, which is rewritten at once.

    Args:
        out: the shard directory or prefix.
        plan: inputs per shard (``shards.format.plan.assign_shards``).
        todo: the shards this run writes.
        source: the inputs.
        manifest: the manifest being written (its "shards" grows).
        num_classes: the teacher's classes.
        strict: stop at the first undecodable input instead of skipping it.
    """

    def __init__(self, *, out: str, plan: list[list[int]], todo: list[int], source: Source,
                 manifest: dict[str, Any], num_classes: int, strict: bool = False) -> None:
        self.out, self.plan, self.source, self.manifest = out, plan, source, manifest
        self.num_classes, self.strict = num_classes, strict
        self.shard_of = {i: s for s in todo for i in plan[s]}
        self.pending: dict[int, dict[int, dict[str, Any]]] = {s: {} for s in todo}
        self.seen = dict.fromkeys(todo, 0)
        self.skipped: dict[int, list[dict[str, str]]] = {s: [] for s in todo}
        self.written: list[dict[str, Any]] = []
        self.futures: list[Future] = []
        self.pool = ThreadPoolExecutor(max_workers=2)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take a labelled batch (:class:`ViewTeacher`'s output) and pack the shards it completes."""
        for i, index in enumerate(batch["index"].tolist()):
            s = self.shard_of[index]
            self.seen[s] += 1
            if batch["ok"][i]:
                self.pending[s][index] = {k: batch[k][i] for k in batch if k not in ("index", "ok", "reason")}
            else:
                reason, path = str(batch["reason"][i]), self.source.candidates[index].path
                if self.strict:
                    raise LabelError(f"{path}: {reason} (--strict stops at the first undecodable input)")
                self.skipped[s].append({"path": path, "reason": reason})
            if self.seen[s] == len(self.plan[s]):
                self.futures.append(self.pool.submit(
                    pack, out=self.out, shard=s, plan=self.plan, source=self.source, rows=self.pending.pop(s),
                    skipped=self.skipped[s], num_classes=self.num_classes))
        self.collect(block=False)

    def collect(self, *, block: bool) -> None:
        """Add the packed shards to the manifest (all of them, waiting, with ``block``)."""
        for f in [f for f in self.futures if block or f.done()]:
            self.futures.remove(f)
            entry = f.result()
            self.written.append(entry)
            self.manifest["shards"] = sorted(self.manifest["shards"] + [entry], key=lambda e: e["first_index"])
            write_manifest(self.out, self.manifest)

    def close(self) -> None:
        """Wait for the shards being packed (they land before any error surfaces)."""
        try:
            self.collect(block=True)
        finally:
            self.pool.shutdown(wait=True)


def label_local(chunks: Iterable[list[dict[str, Any]]], *, decode: dict[str, Any], teacher: dict[str, Any],
                threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Label ``chunks`` in this process: threads decode the chunks ahead while the teacher labels
    the current one. Yields each chunk's labelled rows, in chunk order.

    Args:
        chunks: each a list of :func:`chunk_items` dicts.
        decode: :func:`decode_chunk`'s keyword arguments.
        teacher: :class:`ViewTeacher`'s keyword arguments.
        threads: decoding threads (default: the CPUs this process may use).
    """
    threads = threads or local_cpus()
    view_teacher = ViewTeacher(**teacher)
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        return
    chunks = itertools.chain([first], chunks)
    ahead_of = view_teacher.render if view_teacher.renders_ahead else None

    def prepare(items: list[dict[str, Any]]) -> dict[str, Any]:
        decoded = decode_chunk(items, **decode)
        return ahead_of(decoded) if ahead_of else decoded

    with ThreadPoolExecutor(max_workers=threads) as pool:
        depth = _lookahead(len(first), decode, threads, rendered=ahead_of is not None)
        ahead: deque[Future] = deque(pool.submit(prepare, c) for c in itertools.islice(chunks, depth))
        while ahead:
            prepared = ahead.popleft().result()
            nxt = next(chunks, None)
            if nxt is not None:
                ahead.append(pool.submit(prepare, nxt))
            yield view_teacher(prepared)


_DECODED_BUDGET = 2 << 30  # bytes of decoded views held ahead of the teacher


def _lookahead(images: int, decode: dict[str, Any], threads: int, *, rendered: bool = False) -> int:
    """Chunks decoded ahead: two a thread, fewer where a chunk's views are large (hundreds of
    views an image at 224 px are about 60 MB an image; four times that once ``rendered`` as
    floats), never under two."""
    prep = decode.get("prep") or {}
    side = (decode.get("augment") or {}).get("size") or prep.get("crop") or 224
    if rendered:
        side = max(side, prep.get("crop") or side)
    chunk_bytes = images * (int(decode.get("views", 0)) + 1) * 3 * side * side * (4 if rendered else 1)
    return max(2, min(2 * threads, _DECODED_BUDGET // max(chunk_bytes, 1)))


def consume(batches: Iterable[dict[str, np.ndarray]], packer: ShardPacker,
            on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Feed labelled batches to ``packer`` until they end; returns the shards written."""
    try:
        for batch in batches:
            packer.add(batch)
            if on_batch is not None:
                on_batch(len(batch["index"]))
    finally:
        packer.close()
    return packer.written


def inputs_summary(source: Source, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's "inputs": found = labelled + skipped (labelled: by the teacher; of those,
    ``without_true_label`` carry the teacher's label alone), and what was ignored by name."""
    skipped = [{"path": p, "reason": r} for p, r in source.skipped]
    for entry in shards:
        skipped += entry.get("skipped", [])
    labelled = sum(e["samples"] for e in shards)
    return {"found": len(source.candidates) + len(source.skipped), "labelled": labelled,
            "without_true_label": sum(e.get("unlabeled", 0) for e in shards),
            "skipped": skipped, "ignored": len(source.ignored), "ignored_examples": source.ignored[:20]}


def local_cpus() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
